"""bench.py's parts, one concern a module: the official compute path re-created (official), timing
and peak memory (timing), the methods each case compares (methods), each case's exact reference, the
method in fp32 (reference), the checks of every method's first output against it and of the graph
and compile methods against eager steps (checks), the tables and the README's Markdown table
(table), the CPU models of a step's GPU memory (memory) and GPU work (cost), and data-parallel CoOp
(scaling); ImageNet's class names (imagenet_classnames.txt). attention (python3 -m
benchmarks.attention) times kernels/attention.py against SDPA at the train steps' shapes. A folder beside bench.py, not
installed: run bench.py from the repository."""
