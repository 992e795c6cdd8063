"""Evolutionary time-step search (AutoDiffusion, Li et al. 2023), done right.

* Genome: K *distinct, sorted* grid indices in 0..n-1 (the evaluated nodes; the terminal σ=0 is
  appended). Operators never produce a duplicate — AutoDiffusion's code can, and then silently
  samples with fewer steps.
* Initial population: every baseline valid for the model (snapped to the grid without
  collisions), their mutants, and random genomes.
* Each generation keeps the ``elite`` best, then fills the population with mutants of elites
  and uniform crossovers of two elites (followed by a mutation); a fitness cache skips genomes
  already visited.
* Fitness (lower is better): by default the mean squared distance of the final samples to the
  teacher's (:func:`~schedules.search.common.search_teacher`, Heun on the grid) on a fixed set
  of search samples; any ``fitness(sigmas) -> float`` can be plugged in (e.g. an FID from
  :mod:`eval`).
* Checkpoint after every generation (atomic JSON: population, cache, RNG state); a search
  started again with the same checkpoint resumes and ends with exactly the same result as an
  uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from schedules.baselines import BASELINES, steps_for
from schedules.io import StepsmithError, atomic_write_json, check_output_path
from schedules.search.common import (
    check_finite,
    grid_index,
    make_grid,
    rollout,
    search_teacher,
)
from schedules.search.resume import checkpoint_key, cost_counter, tensor_key
from schedules.table import TimestepTable
from schedules.teacher import Teacher, teacher_sample

Genome = tuple[int, ...]


def is_valid(genome, K: int, n: int) -> bool:
    g = list(genome)
    return len(g) == K and all(0 <= v < n for v in g) and all(a < b for a, b in zip(g, g[1:]))


def random_genome(rng: np.random.Generator, K: int, n: int, fix_start: bool) -> Genome:
    if fix_start:
        rest = rng.choice(np.arange(1, n), size=K - 1, replace=False) if K > 1 else []
        return tuple(sorted([0, *map(int, rest)]))
    return tuple(sorted(map(int, rng.choice(n, size=K, replace=False))))


def mutate(rng: np.random.Generator, genome: Genome, n: int, p: float, fix_start: bool) -> Genome:
    """Each gene moves with probability ``p`` to an unused index: half the time a neighbour
    (±1..3), otherwise anywhere. At least one gene moves. The result is sorted and distinct."""
    g = list(genome)
    K = len(g)
    movable = list(range(1 if fix_start else 0, K))
    if not movable:
        return tuple(g)
    which = [m for m in movable if rng.random() < p] or [int(rng.choice(movable))]
    for m in which:
        used = set(g)
        lo = 1 if fix_start else 0
        if rng.random() < 0.5:
            cand = [g[m] + d for d in (-3, -2, -1, 1, 2, 3) if lo <= g[m] + d < n and g[m] + d not in used]
        else:
            cand = [v for v in range(lo, n) if v not in used]
        if cand:
            g[m] = int(rng.choice(cand))
    return tuple(sorted(g))


def crossover(rng: np.random.Generator, a: Genome, b: Genome, n: int, fix_start: bool) -> Genome:
    """Uniform crossover of sorted genomes: per position take a's or b's gene; duplicates are
    replaced by unused genes of the two parents, then by random unused indices."""
    K = len(a)
    child: list[int] = []
    for x, y in zip(a, b):
        v = x if rng.random() < 0.5 else y
        if v not in child:
            child.append(v)
    pool = [v for v in sorted(set(a) | set(b)) if v not in child]
    rng.shuffle(pool)
    while len(child) < K and pool:
        child.append(int(pool.pop()))
    lo = 1 if fix_start else 0
    while len(child) < K:
        v = int(rng.integers(lo, n))
        if v not in child:
            child.append(v)
    if fix_start and 0 not in child:
        child[int(np.argmin(child))] = 0
    return tuple(sorted(int(v) for v in child))


def snap_genome(grid: list[float], sigmas: list[float], n: int, fix_start: bool) -> Genome:
    idx = grid_index(grid, sigmas[:-1])
    K = len(idx)
    if fix_start:
        idx[0] = 0
    for m in range(1, K):
        idx[m] = max(idx[m], idx[m - 1] + 1)
    for m in range(K - 1, -1, -1):
        idx[m] = min(idx[m], n - (K - m))
        if m > 0 and idx[m - 1] >= idx[m]:
            idx[m - 1] = idx[m] - 1
    return tuple(int(v) for v in idx)


def _is_genome_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(g, list) and all(type(i) is int for i in g) for g in v)


def _well_formed(state) -> bool:
    """Whether ``state`` has the fields and types :func:`evolve` writes."""
    if not isinstance(state, dict) or not isinstance(state.get("rng"), dict):
        return False
    cache = state.get("cache")
    return (type(state.get("generation")) is int and _is_genome_list(state.get("population"))
            and isinstance(cache, list) and all(isinstance(e, list) and len(e) == 2 for e in cache)
            and _is_genome_list([e[0] for e in cache])
            and all(isinstance(e[1], (int, float)) and not isinstance(e[1], bool) for e in cache))


def read_checkpoint(ckpt: Path, config_key: str) -> dict | None:
    """The state saved in ``ckpt`` (``None``: no checkpoint yet); refused, with what to do, when it is
    malformed or belongs to another search."""
    if not ckpt.exists():
        return None
    if ckpt.is_dir():
        raise StepsmithError(f"`checkpoint` {ckpt} is a directory; give a JSON file path", param="checkpoint")
    try:
        state = json.loads(ckpt.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not _well_formed(state):
        raise StepsmithError(f"checkpoint {ckpt} is corrupt or not an evolution checkpoint; delete it to start "
                             "over", param="checkpoint")
    if state.get("config_key") != config_key:
        raise StepsmithError(f"checkpoint {ckpt} belongs to another search (model, conditioning, nfe, solver, seed, "
                             "options or data); delete it or choose another checkpoint path", param="checkpoint")
    return state


def _load_checkpoint(ckpt: Path, config_key: str, rng: np.random.Generator) -> tuple[dict, list[Genome], int]:
    """Resume a search: restores ``rng`` in place; returns (fitness cache, population, next generation)."""
    state = read_checkpoint(ckpt, config_key)
    try:
        rng.bit_generator.state = state["rng"]
    except (ValueError, TypeError, KeyError):
        raise StepsmithError(f"checkpoint {ckpt} holds a corrupt RNG state; delete it to start over",
                             param="checkpoint") from None
    cache = {tuple(k): float(v) for k, v in state["cache"]}
    return cache, [tuple(g) for g in state["population"]], int(state["generation"]) + 1


def check_options(*, seed, samples, grid, population, generations, elite, p_mutation, p_crossover) -> None:
    """Refuse, before any model call, options the search cannot run with (the CLI passes
    ``--option population=ten`` through as the string ``'ten'``)."""
    ints = {"seed": (seed, 0), "samples": (samples, 1), "population": (population, 2),
            "generations": (generations, 1), "elite": (elite, 1), "grid": (100 if grid is None else grid, 2)}
    for name, (v, lo) in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise StepsmithError(f"`{name}` must be an integer of at least {lo}, got {v!r}", param=name)
    if elite > population:
        raise StepsmithError(f"`elite` {elite} exceeds `population` {population}", param="elite")
    for name, p in (("p_mutation", p_mutation), ("p_crossover", p_crossover)):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise StepsmithError(f"`{name}` must be a probability in [0, 1], got {p!r}", param=name)


def _initial_population(rng: np.random.Generator, initial: list[Genome], K: int, n: int, population: int,
                        p_mutation: float, fix_start: bool) -> list[Genome]:
    """The valid seeds, their mutants (up to about half the population), then random genomes."""
    seen: list[Genome] = []
    for g in initial:
        if is_valid(g, K, n) and g not in seen:
            seen.append(g)
    base = list(seen)
    for g in base:
        if len(seen) >= population // 2 + len(base) // 2:
            break
        m = mutate(rng, g, n, p_mutation, fix_start)
        if m not in seen:
            seen.append(m)
    tries = 0
    while len(seen) < population and tries < 100 * population:
        tries += 1
        r = random_genome(rng, K, n, fix_start)
        if r not in seen:
            seen.append(r)
    return seen


def _children(rng: np.random.Generator, parents: list[Genome], cache: dict, K: int, n: int, population: int,
              p_mutation: float, p_crossover: float, fix_start: bool) -> list[Genome]:
    """The elites, then new genomes: crossovers of two elites (half of them mutated) or mutants of one."""
    children: list[Genome] = list(parents)
    tries = 0
    while len(children) < population and tries < 50 * population:
        tries += 1
        if len(parents) > 1 and rng.random() < p_crossover:
            i, j = rng.choice(len(parents), size=2, replace=False)
            c = crossover(rng, parents[int(i)], parents[int(j)], n, fix_start)
            if rng.random() < 0.5:
                c = mutate(rng, c, n, p_mutation, fix_start)
        else:
            c = mutate(rng, parents[int(rng.integers(len(parents)))], n, p_mutation, fix_start)
        if c not in children and c not in cache:
            children.append(c)
    while len(children) < population:  # search space nearly exhausted: allow revisits
        c = random_genome(rng, K, n, fix_start)
        if c not in children:
            children.append(c)
    return children


def evolve(fitness: Callable[[Genome], float], K: int, n: int, *, seed: int = 0, population: int = 24,
           generations: int = 12, elite: int = 6, p_mutation: float = 0.25, p_crossover: float = 0.5,
           initial: list[Genome] | None = None, fix_start: bool = False, checkpoint: str | Path | None = None,
           config_key: str = "", progress: bool = False, on_generation: Callable[[int], None] | None = None,
           spent: Callable[[], dict] | None = None) -> tuple[Genome, float, dict]:
    """Generic elitist GA over valid genomes; returns (best genome, its fitness, stats).

    ``spent()`` (the cost so far, e.g. model calls and seconds) is saved in every checkpoint, so a
    resumed search can report the cost of the whole search.
    """
    if K > n:
        raise StepsmithError(f"{K} steps do not fit a grid of {n} evaluable nodes")
    if population < 2 or not 1 <= elite <= population:
        raise StepsmithError("evolution needs population ≥ 2 and 1 ≤ elite ≤ population")
    rng = np.random.default_rng(seed)
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        cache, pop, start_gen = _load_checkpoint(ckpt, config_key, rng)
    else:
        cache, start_gen = {}, 0
        pop = _initial_population(rng, initial or [], K, n, population, p_mutation, fix_start)

    def score(g: Genome) -> float:
        if g not in cache:
            v = float(fitness(g))
            if not np.isfinite(v):
                raise StepsmithError(f"fitness of genome {list(g)} is not finite ({v}); the model returned NaN/Inf?")
            cache[g] = v
        return cache[g]

    bar = tqdm(range(start_gen, generations), desc="evolution", disable=not progress, leave=False)
    for gen in bar:
        pop_scored = sorted({g: score(g) for g in pop}.items(), key=lambda kv: (kv[1], kv[0]))
        if gen == generations - 1:
            pop = [g for g, _ in pop_scored]
        else:
            pop = _children(rng, [g for g, _ in pop_scored[:elite]], cache, K, n, population, p_mutation,
                            p_crossover, fix_start)
        bar.set_postfix(best=f"{pop_scored[0][1]:.4g}")
        if ckpt is not None:
            atomic_write_json(ckpt, {"config_key": config_key, "generation": gen, "population": [list(g) for g in pop],
                                     "cache": [[list(k), v] for k, v in cache.items()],
                                     "rng": rng.bit_generator.state, "spent": spent() if spent else {}})
        if on_generation is not None:
            on_generation(gen)
    final = sorted(((g, score(g)) for g in set(pop) | set(cache)), key=lambda kv: (kv[1], kv[0]))
    best, val = final[0]
    return best, val, {"evaluated": len(cache), "generations": generations}


def _seed_genomes(adapter, nfe: int, solver: str, grid: list[float], fix_start: bool) -> list[Genome]:
    """Every baseline valid for the model, snapped to the grid (baselines the model refuses are skipped)."""
    n = len(grid) - 1
    out = []
    for fn in BASELINES.values():
        try:
            out.append(snap_genome(grid, fn(adapter, nfe, solver).sigmas, n, fix_start))
        except StepsmithError:
            continue
    return out


def _teacher_fitness(adapter, solver: str, grid: list[float], samples: int, seed: int,
                     objective: str = "teacher-mse", features=None) -> tuple[Teacher, Callable[[list[float]], float], dict]:
    """The default fitness: ``objective`` (:mod:`schedules.search.objectives`; default the final mse) of
    ``solver``'s samples along a table against the search teacher's, on fixed noises."""
    from schedules.search.objectives import make_scorer

    teacher = search_teacher(grid)
    noise = adapter.noise(samples, seed)
    target = teacher_sample(adapter, noise, teacher, batch_size=16).x
    check_finite(target, "the reference trajectory")
    score, oprov = make_scorer(objective, target, model_name=adapter.name, features=features)

    def fit(sigmas: list[float]) -> float:
        return score(rollout(adapter, solver, sigmas, x=noise))

    return teacher, fit, oprov


def _earlier_cost(checkpoint: str | Path | None, key: str) -> dict:
    """The cost recorded in a checkpoint being resumed (checked before any model call)."""
    if not checkpoint:
        return {}
    if not isinstance(checkpoint, (str, Path)):
        raise StepsmithError(f"`checkpoint` must be a file path, got {checkpoint!r}", param="checkpoint")
    check_output_path(checkpoint, param="checkpoint")
    state = read_checkpoint(Path(checkpoint), key)
    spent = (state or {}).get("spent")
    return spent if isinstance(spent, dict) else {}


def _resumed_cost(spent: Callable[[], dict], earlier: dict) -> dict:
    """For a resumed search, the whole search's model calls and seconds (make_table keeps these)."""
    return {**spent(), "resumed": dict(earlier)} if earlier else {}


def data_key(model_name: str) -> str:
    """A data objective's real data, by content (its fitness values hold for that data only)."""
    from schedules.search.objectives import model_data

    return tensor_key(model_data(model_name)[0])


def evolution_table(adapter, nfe: int, solver: str = "euler", *, samples: int = 64, seed: int = 0,
                    progress: bool = False, grid: int | None = None, grid_kind: str = "auto",
                    population: int = 24, generations: int = 12, elite: int = 6, p_mutation: float = 0.25,
                    p_crossover: float = 0.5, fix_start: bool = False, checkpoint: str | None = None,
                    fitness: Callable[[list[float]], float] | None = None,
                    on_generation: Callable[[int], None] | None = None, objective: str | None = "auto",
                    features=None) -> TimestepTable:
    """AutoDiffusion search for ``make_table(method="evolution")``.

    By default the search also chooses where sampling starts (the noise may be read as the state at
    a later node, like diffusers' 'leading' spacing); ``fix_start=True`` pins the first node to σ_max.
    The fitness is ``objective`` of the final samples against the search teacher's (Heun on the grid):
    ``auto`` (default) is feature-mse for a model with a feature network, else the final mse
    (:mod:`schedules.search.objectives`, ``features`` its feature network); or a custom ``fitness``.
    """
    from schedules.search.objectives import feature_name, objective_kind, resolve_objective

    if fitness is not None and objective not in (None, "auto", "teacher-mse"):
        raise StepsmithError("give either a custom `fitness` or an `objective`, not both", param="objective")
    objective = "teacher-mse" if fitness is not None else resolve_objective(objective, adapter.name, features)
    fname = feature_name(objective, adapter.name, features)  # refuse before any model call
    check_options(seed=seed, samples=samples, grid=grid, population=population, generations=generations,
                  elite=elite, p_mutation=p_mutation, p_crossover=p_crossover)
    K = steps_for(adapter, nfe, solver)
    g = make_grid(adapter.convention, int(grid or 100), grid_kind)
    n = len(g) - 1
    if K > n:
        raise StepsmithError(f"NFE {nfe} ({K} steps) does not fit a grid of {n + 1} nodes; lower --nfe or raise --grid")
    key = checkpoint_key(adapter, nfe=nfe, solver=solver, seed=seed, samples=samples, grid=n, kind=grid_kind, population=population,
                      generations=generations, elite=elite, pm=p_mutation, pc=p_crossover, fix_start=fix_start,
                      custom_fitness=fitness is not None,
                      **({} if objective == "teacher-mse" else {"objective": objective, "features": fname}),
                      **({"data": data_key(adapter.name)} if objective.startswith("data-") else {}))
    earlier = _earlier_cost(checkpoint, key)
    spent = cost_counter(adapter, earlier)
    t0 = time.perf_counter()
    teacher, fit, oprov = (None, fitness, {}) if fitness is not None else \
        _teacher_fitness(adapter, solver, g, samples, seed, objective, features)
    t_ref = time.perf_counter() - t0
    best, val, stats = evolve(lambda gen: fit([g[i] for i in gen] + [0.0]), K, n, seed=seed, population=population,
                              generations=generations, elite=elite, p_mutation=p_mutation, p_crossover=p_crossover,
                              initial=_seed_genomes(adapter, nfe, solver, g, fix_start), fix_start=fix_start,
                              checkpoint=checkpoint, config_key=key, progress=progress, on_generation=on_generation,
                              spent=spent)
    prov = {"grid": {"nodes": n + 1, "kind": grid_kind, "convention": adapter.convention.name},
            "population": population, "generations": generations, "elite": elite, "genomes_evaluated":
            stats["evaluated"], "reference_seconds": round(t_ref, 3), "genome": list(best),
            "teacher": None if teacher is None else teacher.describe(),
            "objective_kind": "custom fitness" if teacher is None else objective_kind(objective, fname, teacher.name),
            **oprov,
            "checkpoint": checkpoint, **_resumed_cost(spent, earlier)}
    return TimestepTable.from_sigmas([g[i] for i in best] + [0.0], convention=adapter.convention,
                                     prediction=adapter.prediction, solver=solver, method="evolution",
                                     model=adapter.name, objective=val, provenance=prov)
