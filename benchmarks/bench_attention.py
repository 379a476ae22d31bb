"""Local attention vs FlexAttention, dense SDPA and Hugging Face; see archopt/bench/attention.py.

python benchmarks/bench_attention.py --threads 2 --variants --plot attention.png
"""

from archopt.bench.attention import main

if __name__ == "__main__":
    main()
