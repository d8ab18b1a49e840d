"""The CIFAR-10 example: the scripts end to end, the pipeline and training, label files, flags and paths, hostile
inputs, reuse of results, LDS, checkpoint conversion."""
