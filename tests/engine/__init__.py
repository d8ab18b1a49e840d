"""The engine (influence/): against the float64 oracle, resume and errors, devices, several processes, preemption of
passes, the library as packaged."""
