"""Proposing candidates: generations of pymoo's NSGA-II (Deb et al., 2002) on integer genes,
or uniform random genomes, each yielded with the ``tell`` that hands back their figures.

pymoo is imported when the first NSGA-II generation is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from archopt.search.space import SearchSpace


def nsga2_proposals(
    space: SearchSpace, n_obj: int, pop_size: int, seed: int
) -> Iterator[tuple[list[list[int]], Callable]]:
    """Generations of NSGA-II: yields (genomes, tell); call tell(F, G) with the first k rows."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.core.repair import Repair
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.problems.static import StaticProblem

    class Canonical(Repair):
        """Rounded genes, then the ones the network does not use set to 0 (one genome each)."""

        def _do(self, problem, X, **kwargs):
            X = np.clip(np.round(X), problem.xl, problem.xu).astype(int)
            return np.array([space.canonical(x) for x in X], dtype=int)

    genes = space.genes()
    problem = Problem(
        n_var=len(genes),
        n_obj=n_obj,
        n_ieq_constr=1,
        xl=np.zeros(len(genes)),
        xu=np.array([len(g.choices) - 1 for g in genes], dtype=float),
        vtype=int,
    )
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        repair=Canonical(),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_evals", 10**12), seed=seed)
    while True:
        pop = algorithm.ask()
        if pop is None:  # no offspring that is not a duplicate: the population has converged
            return
        X = [[int(v) for v in x] for x in pop.get("X")]
        told = {}

        def tell(F, G, pop=pop, told=told):
            k = len(F)
            part = pop[:k]
            static = StaticProblem(problem, F=np.asarray(F, float), G=np.asarray(G, float))
            Evaluator().eval(static, part)
            algorithm.tell(infills=part)
            told["k"] = k

        yield X, tell


def random_proposals(space: SearchSpace, seed: int) -> Iterator[tuple[list[list[int]], Callable]]:
    """Uniform random genomes, one per round; their ``tell`` does nothing."""
    rng = np.random.default_rng(seed)
    while True:
        yield [space.sample(rng)], lambda F, G: None


__all__ = ["nsga2_proposals", "random_proposals"]
