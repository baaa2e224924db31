"""`kvmpy fuzz`: a generic device fuzzer through the real exit path (docs/fuzzing.md).

ops.py decodes an input into port/MMIO/RAM operations; targets.py names the devices
and their windows; rigs.py runs the ops in a real VM (an op interpreter guest, fast
reset between inputs) or straight into the buses; oracles.py says what is a bug;
runner.py is the loop, the engines and the reproducers; command.py the command line.
"""
