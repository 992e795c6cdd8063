"""Optimal Linear Subspace Search (OLSS; Duan et al. 2023, "Optimal Linear Subspace Search: Learning to
Construct Fast and High-Quality Schedulers for Diffusion Models").

A first-order sampler step is linear in what it has seen (DDIM's next state lies in span{x_t, e_t}), so a
K-step sampler may be *any* linear combination of the initial noise and the model outputs so far:

    x_{k+1} = w_x[k]·x_T + Σ_{j≤k} w_e[k, j]·e_j,      e_j = model output at (x_j, σ_{p_j}).

The outputs e_j are the network's **native outputs** (velocity, ε, v or x0 — what a diffusers
scheduler's ``step`` receives), as in the paper, so the coefficients hold for one prediction type and
one guidance scale only; replay refuses any other.

Fit (:func:`olss_table`): a teacher of ``teacher_steps`` Euler (= DDIM) steps on the model's search
grid is run on the search samples, keeping every node's state x_n and output e_n. A path
0 = p_0 < ... < p_{K-1} < p_K = N of grid nodes is chosen by bisection on a per-step error
threshold τ: from the current node the walk jumps to the *farthest* node whose one-step fit (least
squares of its teacher state on x_T and the outputs at the path's nodes so far) has mean squared
error ≤ τ; τ is feasible when the walk reaches the end in ≤ K steps, and the smallest feasible τ
found by ``bisection`` halvings gives the path (if that walk uses fewer than K steps its longest
jumps are split at their grid midpoints, so the table spends exactly the budget). The walk's errors
come from one Gram matrix of all teacher vectors, so this open-loop walk makes no model call beyond
the teacher's. The walk can also score the closed-loop fit below (``walk_fit="closed"``,
:class:`_ClosedScorer`): a prefix's student state is the fit of its last node, one model call there
gives its output, and every later node's error is its least-squares fit on those student features.
Greedy farthest jumps are not optimal under either score, and neither wins everywhere, so the
default (``walk_fit="auto"``) runs both walks and keeps the table whose replay ends closer to the
teacher's final states on the search samples (its objective). Measured (32 search samples, NFE
4/6/8, that objective for open / closed walk): digits-ddpm 0.031 / 0.0031, 0.026 / 0.0016,
0.0034 / 0.0014; sharp-ddpm 0.19 / 0.12, 0.056 / 0.073, 0.053 / 0.033; digits-flow 0.0015 / 0.059,
0.00032 / 0.056, 0.000098 / 0.0076 (there the closed walk's greedy first jump goes too far).

Coefficients (``fit="closed"``, the default; :func:`fit_closed_loop`): fitted step by step on the
*student's own* quantities. Step k replays rows 0..k-1 from the search noise to the student's state
x_k, calls the model there once (K calls in all on the search samples) and regresses the teacher
state at the next path node on x_T and the student's outputs e_0..e_k, by float64 least squares
over all pixels and samples at once. The regression is written as a residual on the plain
Euler/DDIM step from x_k (x_{k+1} = a·x_k + b·e_k + Σ r_i·f_i; x_k is itself a combination of x_T
and the earlier outputs, so the stored row keeps the format above), which makes r = 0 the plain
solver: each step's fit error on the search samples is never worse than the DDIM step from the same
state (``ddim_step_errors`` in the provenance). Why: the open-loop fit (``fit="open"``: each row on
the *teacher's* outputs at the path nodes, the paper's / reference code's fit) does not see what the
replay feeds it. On a VP ε model x_T and ε are nearly collinear at high σ, so the fit extracts x0
from huge cancelling weights (e.g. 24.5·x_T − 23.8·ε₀ at σ = 157); the student's outputs differ a
little from the teacher's, and those weights blow the difference up step after step. Measured on
builtin:digits-ddpm, NFE 4, 32 search samples, the same path: the open-loop rows replay with MSE 63
to the teacher's final state (70 on 128 held-out noises), plain DDIM along the path 1.15 (1.00),
the closed-loop rows 0.031 (0.033), largest weight 34. A ridge penalty on the residual, relative to
each feature's scale (``ridge``), was measured too and only hurt (held-out MSE 0.060 / 0.12 / 0.14
at 1e-4 / 1e-3 / 1e-2): it shrinks the well-determined x_T − ε direction that carries x0 at high σ.
Closed loop bounds the weights by itself, so the default is ``ridge = 0``.

Differences from the reference code: its walk fits the jump from the *current teacher state* plus the
outputs, then re-solves the coefficients on x_T; here the walk scores a fit on x_T and the outputs
(the teacher's, the student's, or both walks), it scans every candidate node instead of bisecting on the index (the error
need not grow monotonically with the jump), and the coefficients on the found path are fitted
closed-loop (above).

Replay: :func:`olss_sample` (used by :func:`schedules.solvers.sample_table`, ``stepsmith sample`` and
the eval sweep) and the stateless diffusers scheduler
:class:`schedules.diffusers.olss_scheduler.OLSSScheduler`; both combine with :func:`combine`.
Memory: the teacher keeps (2·teacher_steps + 1)·samples states of the model's shape; the closed-loop
walk adds a float64 copy of the teacher states and the features of every visited prefix. Cost beyond
the teacher: K model calls on the search samples for the closed-loop fit, one per visited prefix for
the closed walk (15-40 prefixes at NFE 4-8 on the builtin models), and K per walk for the replay.
Held-out FID (builtin models, 32 search samples, 500 samples from seed 10000, NFE 4/6/8): digits-ddpm
DDIM 64334 / 114000 / 96330 with the open-loop fit → 72.5 / 68.0 / 66.8 (default); sharp-ddpm DDIM
4502 / 1312 / 128 → 76.6 / 69.8 / 64.0; digits-flow Euler 88.8 / 81.1 / 76.2 → 81.5 / 77.1 / 74.5.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from schedules.baselines import steps_for
from schedules.conditioning import bind, conditioning_of, micro_batches
from schedules.conventions import prediction_to_x0
from schedules.io import StepsmithError
from schedules.search.common import check_finite, final_mse_kind, make_grid, mse, validate_budget
from schedules.solvers import euler_step, integrate
from schedules.table import OLSS_VERSION, TimestepTable
from schedules.teacher import Teacher

DEFAULT_TEACHER_STEPS = 100
FIT_SOLVERS = ("olss", "euler", "ddim")  # make_table's solver: the table always replays with "olss"
FITS = ("closed", "open")
DEFAULT_RIDGE = 0.0


# --------------------------------------------------------------------------- teacher trajectories


@dataclass
class Trajectories:
    """The teacher's states at every grid node (``states[n]``, n = 0..N; states[0] the noise, states[N] the
    final sample) and its native model outputs at every evaluated node (``outputs[n]``, n = 0..N-1)."""

    sigmas: list[float]
    states: torch.Tensor  # [N+1, B, ...]
    outputs: torch.Tensor  # [N, B, ...]
    prediction: str

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


class _Recorder:
    """A denoiser that keeps every native output it computes (the adapter's own x0 conversion otherwise)."""

    def __init__(self, adapter):
        self.adapter, self.convention, self.outputs = adapter, adapter.convention, []

    def denoise(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = self.adapter.model_output(x, s)
        self.outputs.append(out)
        sb = s.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return prediction_to_x0(self.convention, self.adapter.prediction, x, sb, out)


def _check_adapter(adapter) -> None:
    if not (hasattr(adapter, "model_output") and hasattr(adapter, "prediction")):
        raise StepsmithError(f"OLSS combines native model outputs: it needs a model adapter with model_output() and "
                             f"a prediction type, got {type(adapter).__name__}", param="adapter")


@torch.no_grad()
def teacher_trajectories(adapter, noise: torch.Tensor, sigmas: list[float], *, batch_size: int | None = None,
                         progress: bool = False) -> Trajectories:
    """Euler (= DDIM) along ``sigmas`` from ``noise``, keeping every state and native output (micro-batched)."""
    _check_adapter(adapter)
    states, outputs = [], []
    slices = micro_batches(len(noise), batch_size)
    for sl in tqdm(slices, desc="olss teacher", disable=not progress, leave=False):
        rec, xs = _Recorder(adapter), []
        with bind(sl):
            final = integrate(rec, noise[sl], sigmas, "euler", on_node=lambda _i, _s, st, xs=xs: xs.append(st.x))
        states.append(torch.stack([*xs, final]))
        outputs.append(torch.stack(rec.outputs))
    traj = Trajectories(list(sigmas), torch.cat(states, dim=1), torch.cat(outputs, dim=1), adapter.prediction)
    check_finite(traj.states, "the OLSS teacher trajectory")
    check_finite(traj.outputs, "the OLSS teacher trajectory")
    return traj


# --------------------------------------------------------------------------- least squares


def lstsq_fit(features: list[torch.Tensor], target: torch.Tensor) -> tuple[list[float], float]:
    """Coefficients c minimising mean (Σ_i c_i·features[i] - target)², in float64 over every element
    (samples and pixels flattened together), and that mean squared error."""
    X = torch.stack([f.reshape(-1).to(torch.float64) for f in features], dim=1)
    y = target.reshape(-1, 1).to(torch.float64)
    c = torch.linalg.lstsq(X, y).solution
    err = float(((X @ c - y) ** 2).mean())
    return c.reshape(-1).tolist(), err


def combine(row: list[float], x_T: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The OLSS state w_x·x_T + Σ_j w_e[j]·outputs[j] (``row`` = [w_x, w_e0, ...]), summed in float64."""
    if len(row) != len(outputs) + 1:
        raise StepsmithError(f"an OLSS coefficient row of {len(row)} weights needs {len(row) - 1} model outputs, "
                             f"got {len(outputs)}")
    acc = row[0] * x_T.to(torch.float64)
    for w, e in zip(row[1:], outputs):
        acc = acc + w * e.to(torch.float64)
    return acc.to(x_T.dtype)


class _Gram:
    """Inner products of every teacher vector (x_T, outputs e_0..e_{N-1}, states x_1..x_N), for the walk's
    one-step fits: the error of fitting x_j on a set F of vectors is (|x_j|² - bᵀ G_FF⁻¹ b)/D, b = G_Fj."""

    def __init__(self, traj: Trajectories, chunk: int = 16):
        N = traj.steps
        self.N, self.D = N, traj.states[0].numel()
        G = torch.zeros((2 * N + 1, 2 * N + 1), dtype=torch.float64)
        for sl in micro_batches(traj.states.shape[1], chunk):
            V = torch.cat([traj.states[:1, sl], traj.outputs[:, sl], traj.states[1:, sl]]).to(torch.float64)
            V = V.reshape(2 * N + 1, -1)
            G += (V @ V.T).cpu()
        self.G = G

    def col_output(self, n: int) -> int:
        return 1 + n

    def col_state(self, n: int) -> int:  # n = 1..N
        return self.N + n

    def zero_fit_bound(self) -> float:
        """The largest mean square of a teacher state x_1..x_N (the error of the zero fit)."""
        return float(torch.diagonal(self.G)[self.N + 1:].max()) / self.D

    def errors(self, path: list[int]) -> torch.Tensor:
        """[N+1] mean squared error of fitting each state x_j (j > path[-1]) on x_T and the outputs at ``path``;
        +inf at j ≤ path[-1]."""
        F = [0] + [self.col_output(p) for p in path]
        js = list(range(path[-1] + 1, self.N + 1))
        T = [self.col_state(j) for j in js]
        G_FF, b = self.G[F][:, F], self.G[F][:, T]
        c = torch.linalg.lstsq(G_FF, b).solution
        yy = self.G[T, T]
        err = (yy - 2 * (b * c).sum(0) + (c * (G_FF @ c)).sum(0)) / self.D
        out = torch.full((self.N + 1,), float("inf"), dtype=torch.float64)
        out[js] = err.clamp_min(0)
        return out


def walk(gram: _Gram, K: int, tau: float) -> list[int] | None:
    """Greedy longest-jump walk at threshold ``tau``: the evaluated nodes of a path reaching the end in ≤ K
    steps, or None (some node cannot move within ``tau``, or K steps do not reach the end)."""
    path = [0]
    while True:
        err = gram.errors(path)
        ok = torch.nonzero(err <= tau).reshape(-1)
        if ok.numel() == 0:
            return None
        nxt = int(ok.max())
        if nxt == gram.N:
            return path
        if len(path) == K:
            return None
        path.append(nxt)


def pad_path(path: list[int], K: int, N: int) -> list[int]:
    """Split the longest jumps (in grid nodes) at their midpoints until the path has K evaluated nodes."""
    path = list(path)
    while len(path) < K:
        ends = path + [N]
        gaps = [ends[i + 1] - ends[i] for i in range(len(path))]
        i = max(range(len(gaps)), key=lambda m: (gaps[m], -m))
        if gaps[i] < 2:
            raise StepsmithError(f"{K} steps do not fit a grid of {N} steps", param="nfe")
        path.insert(i + 1, ends[i] + gaps[i] // 2)
    return path


class _ClosedScorer:
    """The walk's one-step errors on the *student's* features (closed loop): for a path prefix, the student's
    state at its last node is the least-squares fit of that teacher state on the parent prefix's features
    (x_T and the student's outputs), its output there is one model call (cached per prefix), and the error of
    each later teacher state is that of its least-squares fit on the prefix's features."""

    def __init__(self, adapter, traj: Trajectories, batch_size: int | None = None):
        self.adapter, self.traj, self.batch_size = adapter, traj, batch_size
        self.N, self.D = traj.steps, traj.states[0].numel()
        self.T = traj.states[1:].reshape(self.N, -1).to(torch.float64)  # [N, D]: x_1..x_N
        self.tt = (self.T ** 2).sum(1)
        self.cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # prefix -> (features, Q)
        self.calls = 0

    def zero_fit_bound(self) -> float:
        return float(self.tt.max()) / self.D

    def _features(self, path: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if path in self.cache:
            return self.cache[path]
        x_T = self.traj.states[0]
        if len(path) == 1:
            x, prev = x_T, x_T.reshape(-1, 1).to(torch.float64)
        else:
            prev, Q = self._features(path[:-1])
            y = self.T[path[-1] - 1]
            c = torch.linalg.lstsq(prev, y.reshape(-1, 1)).solution
            x = (prev @ c).reshape(x_T.shape).to(x_T.dtype)
        e = _outputs_at(self.adapter, x, self.traj.sigmas[path[-1]], self.batch_size)
        self.calls += 1
        F = torch.cat([prev, e.reshape(-1, 1).to(torch.float64)], dim=1)
        Q = torch.linalg.qr(F).Q
        self.cache[path] = (F, Q)
        return F, Q

    def errors(self, path: list[int]) -> torch.Tensor:
        _, Q = self._features(tuple(path))
        js = torch.arange(path[-1] + 1, self.N + 1)
        proj = self.T[js - 1] @ Q  # [J, k+2]
        out = torch.full((self.N + 1,), float("inf"), dtype=torch.float64)
        out[js] = ((self.tt[js - 1] - (proj ** 2).sum(1)) / self.D).clamp_min(0)
        return out


def search_path(traj: Trajectories, K: int, *, bisection: int = 50, scorer=None) -> tuple[list[int], float, bool]:
    """(evaluated grid nodes, smallest feasible threshold found, whether the path was padded to K nodes).
    ``scorer``: the walk's one-step errors (default the open-loop :class:`_Gram` of the teacher's vectors)."""
    validate_budget(K, traj.steps, what="OLSS teacher grid (teacher_steps)")
    gram = _Gram(traj) if scorer is None else scorer
    hi = gram.zero_fit_bound() * (1 + 1e-9) + 1e-300  # the zero fit: feasible
    lo = 0.0
    best = walk(gram, K, hi)
    if best is None:  # cannot happen: every jump fits within its target's own mean square
        raise StepsmithError("OLSS found no feasible path; the teacher trajectory may be degenerate")
    for _ in range(bisection):
        mid = (lo + hi) / 2
        path = walk(gram, K, mid)
        if path is None:
            lo = mid
        else:
            hi, best = mid, path
    return pad_path(best, K, traj.steps), hi, len(best) < K


def fit_path(traj: Trajectories, path: list[int]) -> tuple[list[list[float]], list[float]]:
    """Coefficient rows (step k: x_T and the outputs at path[0..k] → the teacher state at the next node)
    and each step's mean squared fit error."""
    ends = list(path) + [traj.steps]
    rows, errs = [], []
    for k in range(len(path)):
        feats = [traj.states[0]] + [traj.outputs[p] for p in path[:k + 1]]
        row, err = lstsq_fit(feats, traj.states[ends[k + 1]])
        rows.append(row)
        errs.append(err)
    return rows, errs



def ddim_coefficients(conv, prediction: str, s: float, s_next: float) -> tuple[float, float]:
    """(a, b) of the plain Euler (= DDIM) step from sigma ``s`` to ``s_next`` written on the native output:
    x_next = a·x + b·e (the step is linear in the state x and the output e at fixed sigmas)."""
    def step(x: float, e: float) -> float:
        xt, et = torch.tensor(x, dtype=torch.float64), torch.tensor(e, dtype=torch.float64)
        x0 = prediction_to_x0(conv, prediction, xt, torch.tensor(s, dtype=torch.float64), et)
        return float(euler_step(conv, xt, x0, s, s_next))

    return step(1.0, 0.0), step(0.0, 1.0)


def ridge_fit(features: list[torch.Tensor], target: torch.Tensor, ridge: float) -> tuple[list[float], float]:
    """Coefficients r minimising mean (Σ_i r_i·f_i - y)² + ridge·Σ_i r_i²·mean(f_i²) (ridge relative to each
    feature's own scale, so it is dimensionless), in float64 over every element, and the plain mean squared
    error of that fit. ``ridge = 0`` is :func:`lstsq_fit`."""
    if ridge == 0:
        return lstsq_fit(features, target)
    X = torch.stack([f.reshape(-1).to(torch.float64) for f in features], dim=1)
    y = target.reshape(-1, 1).to(torch.float64)
    n = X.shape[0]
    G = X.T @ X / n
    A = G + ridge * torch.diag(torch.diagonal(G))
    c = torch.linalg.solve(A, X.T @ y / n)
    err = float(((X @ c - y) ** 2).mean())
    return c.reshape(-1).tolist(), err


@torch.no_grad()
def _outputs_at(adapter, x: torch.Tensor, s: float, batch_size: int | None) -> torch.Tensor:
    """The model's native outputs at states ``x`` and sigma ``s`` (micro-batched, conditioning bound per slice)."""
    outs = []
    for sl in micro_batches(len(x), batch_size):
        with bind(sl):
            xs = x[sl]
            outs.append(adapter.model_output(xs, torch.full((xs.shape[0],), s, dtype=xs.dtype, device=xs.device)))
    out = torch.cat(outs)
    check_finite(out, "the OLSS closed-loop fit")
    return out


@torch.no_grad()
def fit_closed_loop(adapter, traj: Trajectories, path: list[int], *, ridge: float = 0.0,
                    batch_size: int | None = None) -> tuple[list[list[float]], list[float], list[float]]:
    """Coefficient rows fitted on the student's *own* replayed quantities, step by step (closed loop).

    Step k starts from the student's state x_k (the replay of rows 0..k-1 from the search noise), calls the
    model once there for its output e_k, and fits the teacher state at the next path node as the plain
    Euler/DDIM step from x_k plus a ridge-regularised residual on x_T and the outputs e_0..e_k. The row stored
    is that sum, still a combination of x_T and the outputs (the replay format is unchanged). Returns
    (rows, each step's mean squared error, each step's error of the plain DDIM step from the same state).
    """
    conv, pred, sig = adapter.convention, adapter.prediction, traj.sigmas
    ends = list(path) + [traj.steps]
    x_T = traj.states[0]
    x, state_row, outputs = x_T, [1.0], []
    rows, errs, base_errs = [], [], []
    for k, p in enumerate(path):
        outputs.append(_outputs_at(adapter, x, sig[p], batch_size))
        a, b = ddim_coefficients(conv, pred, sig[p], sig[ends[k + 1]])
        base = [a * w for w in state_row] + [b]
        target = traj.states[ends[k + 1]].to(torch.float64)
        resid = target - _combine64(base, x_T, outputs)
        r, err = ridge_fit([x_T, *outputs], resid, ridge)
        row = [bi + ri for bi, ri in zip(base, r)]
        rows.append(row)
        errs.append(err)
        base_errs.append(float((resid ** 2).mean()))
        state_row = row
        x = combine(row, x_T, outputs)  # exactly what the replay computes
    return rows, errs, base_errs


def _combine64(row: list[float], x_T: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    acc = row[0] * x_T.to(torch.float64)
    for w, e in zip(row[1:], outputs):
        acc = acc + w * e.to(torch.float64)
    return acc


# --------------------------------------------------------------------------- replay


def _guidance(adapter) -> float | None:
    cond = conditioning_of(adapter)
    return None if cond is None else float(cond.guidance)


def check_replay(table: TimestepTable, adapter, what: str | None = None) -> dict:
    """The table's olss block, after refusing a model it does not fit: another convention / noise schedule,
    prediction type or guidance scale than the coefficients were fitted for."""
    what = what or f"model {getattr(adapter, 'name', type(adapter).__name__)}"
    block = table.olss
    if block is None:
        raise StepsmithError(f"table {table.method!r} (solver {table.solver!r}) has no OLSS coefficients; "
                             "build one with --method olss", param="table")
    _check_adapter(adapter)
    if adapter.prediction != block["prediction"]:
        raise StepsmithError(f"the OLSS coefficients combine {block['prediction']}-prediction outputs but {what} "
                             f"predicts {adapter.prediction}; fit a table for this model (--method olss)",
                             param="table")
    table.check_compatible(adapter.convention, adapter.prediction, what=what)
    g, w = block.get("guidance"), _guidance(adapter)
    if (g is None) != (w is None) or (g is not None and float(g) != w):
        have = "no guidance (unconditional)" if g is None else f"guidance {float(g):g}"
        run = "an unconditional run" if w is None else f"guidance {w:g}"
        raise StepsmithError(f"the OLSS coefficients were fitted with {have} but {what} runs {run}; the outputs "
                             "they combine change with guidance — fit a table at this guidance", param="guidance")
    return block


@torch.no_grad()
def olss_sample(adapter, noise: torch.Tensor, table: TimestepTable, *, progress: bool = False) -> torch.Tensor:
    """Replay an OLSS table from ``noise`` (the state at its first sigma): K model calls, each step the fitted
    combination of the noise and every output so far."""
    rows = check_replay(table, adapter)["coefficients"]
    x, outputs = noise, []
    for k in tqdm(range(table.steps), desc="sampling (olss)", disable=not progress, leave=False):
        s = torch.full((x.shape[0],), table.sigmas[k], dtype=x.dtype, device=x.device)
        out = adapter.model_output(x, s)
        check_finite(out, "an OLSS replay")
        outputs.append(out)
        x = combine(rows[k], noise, outputs)
    return x


@torch.no_grad()
def _replay_batched(adapter, noise: torch.Tensor, table: TimestepTable, batch_size: int | None) -> torch.Tensor:
    out = []
    for sl in micro_batches(len(noise), batch_size):
        with bind(sl):
            out.append(olss_sample(adapter, noise[sl], table))
    return torch.cat(out)


# --------------------------------------------------------------------------- the search method


def olss_table(adapter, nfe: int, solver: str = "olss", *, samples: int = 64, seed: int = 0, progress: bool = False,
               teacher_steps: int = DEFAULT_TEACHER_STEPS, bisection: int = 50, batch_size: int = 16,
               fit: str = "closed", ridge: float = DEFAULT_RIDGE, walk_fit: str = "auto") -> TimestepTable:
    """OLSS for ``make_table(method="olss")``: ``nfe`` model calls (one per step), fitted on ``samples`` teacher
    trajectories of ``teacher_steps`` Euler/DDIM steps from noise seed ``seed``.

    ``solver`` may be ``olss`` or ``euler``/``ddim`` (the CLI default; the teacher's first-order solver):
    the table always replays with solver ``olss``. ``fit``: ``closed`` (default; each step fitted on the
    student's own replayed outputs, as a residual on the plain DDIM step, ``ridge`` its relative penalty) or
    ``open`` (the paper's per-step least squares on the teacher's outputs; ``ridge`` unused). ``walk_fit``:
    what the path walk scores — ``open`` (the teacher's outputs, no model call), ``closed`` (the student's own
    outputs, one model call per visited path prefix) or ``auto`` (default: both, keeping the table whose replay
    lands closer to the teacher's final states on the search samples; ``walk_objectives`` in the provenance).
    """
    if solver not in FIT_SOLVERS:
        raise StepsmithError(f"OLSS fits its own update from Euler/DDIM teacher trajectories; use --solver "
                             f"{' | '.join(FIT_SOLVERS)}, not {solver!r}", param="solver")
    if not isinstance(teacher_steps, int) or isinstance(teacher_steps, bool) or teacher_steps < 2:
        raise StepsmithError(f"`teacher_steps` must be an integer ≥ 2, got {teacher_steps!r}", param="teacher_steps")
    if not isinstance(bisection, int) or bisection < 1:
        raise StepsmithError(f"`bisection` must be a positive integer, got {bisection!r}", param="bisection")
    if fit not in FITS:
        raise StepsmithError(f"`fit` must be one of {' | '.join(FITS)}, got {fit!r}", param="fit")
    if walk_fit not in (*FITS, "auto"):
        raise StepsmithError(f"`walk_fit` must be one of auto | {' | '.join(FITS)}, got {walk_fit!r}", param="walk_fit")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (0 <= float(ridge) < float("inf")):
        raise StepsmithError(f"`ridge` must be a finite number ≥ 0 (a relative penalty, e.g. 1e-3), got {ridge!r}",
                             param="ridge")
    _check_adapter(adapter)
    conv = adapter.convention
    K = steps_for(adapter, nfe, "olss")
    grid = make_grid(conv, teacher_steps)
    validate_budget(K, teacher_steps, what="OLSS teacher grid (teacher_steps)")
    t0 = time.perf_counter()
    calls0 = getattr(adapter, "calls", 0)
    noise = adapter.noise(samples, seed)
    traj = teacher_trajectories(adapter, noise, grid, batch_size=batch_size, progress=progress)
    t_teacher, calls_teacher = time.perf_counter() - t0, getattr(adapter, "calls", 0) - calls0
    teacher = Teacher.on_grid(grid, "euler", label="search-grid")
    base = {"solver": "olss", "teacher": teacher.describe(), "bisection": bisection,
            "features": f"x_T and native {adapter.prediction} outputs", "reference_seconds": round(t_teacher, 3),
            "reference_calls": calls_teacher, "objective_kind": final_mse_kind(teacher)}
    tables = {}
    for w in (FITS if walk_fit == "auto" else (walk_fit,)):
        scorer = _ClosedScorer(adapter, traj, batch_size) if w == "closed" else None
        path, tau, padded = search_path(traj, K, bisection=bisection, scorer=scorer)
        if fit == "closed":
            rows, errs, ddim_errs = fit_closed_loop(adapter, traj, path, ridge=float(ridge), batch_size=batch_size)
            fit_info = {"fit": "closed", "ridge": float(ridge), "ddim_step_errors": ddim_errs}
        else:
            rows, errs = fit_path(traj, path)
            fit_info = {"fit": "open"}
        if scorer is not None:
            fit_info["walk_prefixes"] = scorer.calls
        prov = {**base, "path": path, "threshold": tau, "padded": padded, "step_errors": errs, **fit_info, "walk_fit": w}
        # from_sigmas validates a block-less table: build it for Euler (same nodes, same NFE), then make it OLSS
        table = TimestepTable.from_sigmas([grid[p] for p in path] + [0.0], convention=conv,
                                          prediction=adapter.prediction, solver="euler", method="olss",
                                          model=adapter.name, provenance=prov)
        table.solver = "olss"
        table.olss = {"version": OLSS_VERSION, "prediction": adapter.prediction, "guidance": _guidance(adapter),
                      "coefficients": rows}
        table.validate()
        table.objective = mse(_replay_batched(adapter, noise, table, batch_size), traj.states[-1])
        tables[w] = table
    table = min(tables.values(), key=lambda t: t.objective)  # "auto": the walk whose table replays closer
    if len(tables) > 1:
        table.provenance["walk_objectives"] = {w: t.objective for w, t in tables.items()}
    return table


__all__ = ["DEFAULT_RIDGE", "DEFAULT_TEACHER_STEPS", "FITS", "Trajectories", "check_replay", "combine", "ddim_coefficients",
           "fit_closed_loop", "fit_path", "lstsq_fit", "olss_sample", "olss_table", "pad_path", "ridge_fit", "search_path",
           "teacher_trajectories", "walk"]
