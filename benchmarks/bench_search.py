"""Architecture search vs random search vs the hand-designed models; see archopt.bench.search.

    python benchmarks/bench_search.py --space mobilenet --budget 16 --seeds 0 1 2 \
        --threads 1 --plot benchmarks/search_fronts.png --json benchmarks/search.json
    (the same as `archopt bench search ...`)
"""

from archopt.bench.search import main

if __name__ == "__main__":
    main()
