"""Decoding: no cache vs KV caches vs Hugging Face generate; see archopt/bench/generate.py.

python benchmarks/bench_generate.py --threads 2 --plot benchmarks/generate_vs_position.png
"""

from archopt.bench.generate import main

if __name__ == "__main__":
    main()
