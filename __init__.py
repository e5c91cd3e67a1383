"""dpal: pretrain lightweight human-centric vision models by distilling a large teacher (DPAL).

Stage one (`dpal.pipeline`) runs the teacher once and writes a sharded store; stage two
(`dpal.trainer`) trains the student and D-PaDe against it. `dpal.store` is the contract between them.
"""

__version__ = "0.1.0"
