"""The CIFAR-10 example's shared parts, used by the scripts at the top of the repository (not run directly).

run.py        how a script runs: one-line errors, exit codes, signals, torchrun's processes
errors.py     PipelineError, the scripts' one-line error
flags.py      the shared flag groups a script adds in one line, and value types that refuse bad values
hardware.py   bf16 units of the CPU, freed-memory handling
devices.py    the one place a process's device is chosen
checkpoints.py  checkpoint names, writing and checked reading
task.py       the influence task (cross-entropy, margin) and evaluation
results.py    result names, fingerprints, the analyzer with the scripts' flags, reading scores back
figures.py    drawing off-screen and saving whole
training.py   the training recipe: its flags and its resumable loop
sgd.py        the recipe's optimiser (SGD, weight decay, momentum, a learning rate per step)
train_state.py  a training run's state on disk
label_files.py  reading label files and CIFAR pickles with a restricted unpickler
lds.py        the linear datamodeling score's statistics
ranking.py    average ranks (ties share their mean rank), for the ROC AUC and Spearman

pipeline.py (at the top, as in the original example) holds the model and the data.
"""
