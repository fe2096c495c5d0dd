"""Tiny models, bundles and training jobs that the tests and the benchmarks build (not shipped in the wheel).

`tiny_bundle`: an untrained tiny serving bundle and run directory; `tinyjob`: a stage-2-shaped training job that
`torchrun`/`deepspeed` launch for the distributed and kill/resume tests (`python -m testkit.tinyjob`).
"""
