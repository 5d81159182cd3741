"""Dual-task CNNs and their lesions: is a network trained on two visual tasks split into task-specialised parts?

The package's folders are its layers (docs/architecture.md), each importing only those below it:
experiment > analysis > lesion | training > model > config > data | report > stats > core.

`from dualtask import load_run` loads a finished run (its network in eval mode and its settings); the name is
looked up on first use, so that `import dualtask.report` stays free of torch.

OpenMP threads that wait: PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels), whose threads spin
for a long while at the end of every parallel region before they sleep. Beside another CPU-bound job, a thread
that spins keeps the core from the thread it waits for, and a run slowed down 3.7x where the share of cores
explains 2x (BENCHMARKS.md, "The CPU against its own peak"). Unless the environment says otherwise, the spinning is
cut short here, before anything imports torch (GOMP_SPINCOUNT=3000: 6% slower alone, in proportion beside other
jobs); a program that imports torch before dualtask keeps its own setting.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")


def __getattr__(name):
    if name == "load_run":
        from dualtask.experiment.pipeline import load_run

        return load_run
    raise AttributeError(f"module 'dualtask' has no attribute {name!r}")
