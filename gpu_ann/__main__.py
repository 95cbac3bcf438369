from gpu_ann.cli import entry

entry()
