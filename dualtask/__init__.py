"""Dual-task CNNs and their lesions: is a network trained on two visual tasks split into task-specialised parts?

The package's folders are its layers (docs/architecture.md), each importing only those below it:
experiment > analysis > lesion | training > model > config > data | report > stats > core.

`from dualtask import load_run` loads a finished run (its network in eval mode and its settings); the name is
looked up on first use, so that `import dualtask.report` stays free of torch.
"""


def __getattr__(name):
    if name == "load_run":
        from dualtask.experiment.pipeline import load_run

        return load_run
    raise AttributeError(f"module 'dualtask' has no attribute {name!r}")
