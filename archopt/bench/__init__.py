"""Every benchmark, each a module with ``main(argv)``, run as ``archopt bench SUITE`` (or
``python -m archopt.bench.MODULE``); figures, with their command, machine and date, are in
``benchmarks/RESULTS.md``.

- ``attention``: local attention on the CPU vs FlexAttention, dense SDPA and Hugging Face;
  ``attention_gpu``: the Triton backend on one GPU vs FlexAttention and SDPA.
- ``generate`` (the command line) over ``decode`` (no cache vs KV caches vs HF ``generate``)
  and ``decode_sweep`` (weights x caches as a Pareto study; long runs); ``decode_gpu``
  (``archopt bench decode-gpu``): the same on one GPU, with generate's CUDA-graph default.
- ``whole_process`` (``archopt bench cli``): whole processes of ``archopt generate`` against
  llama.cpp's, cold and warm.
- ``vision``: the image models vs timm and onnxruntime; ``quant_linear``: one decode row
  through each quantized linear layer.
- ``anchors``: what they measure against (HF twins, llama.cpp in a child process);
  ``common``: the machine line and its measured floors (matmul rate, memory bandwidth).

Timing is ``archopt.measure`` (``measure_latency``, ``interleaved``); tables and plots are
``archopt.report``. Imports: anything below, never the tour or the CLI.
"""
