"""Online weight-spectrum monitor (the seed's ``--spec-monitor``).

Usage in a training loop::

    mon = SpectralMonitor(model, targets=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
                          topk=8, interval=2, every=100)
    for step, batch in enumerate(loader):          # step = number of optimizer updates
        ...
        metrics = mon.maybe_measure(step)          # {} on non-measuring steps (no work, no sync)
        if metrics:
            logger.log(metrics, step=step)
    mon.save_artifacts(out_dir)

An EMA model gets its own monitor with ``prefix="spec_ema"``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable, Sequence

import torch
from torch import nn

from .common import MatrixEntry, parse_targets, principal_cosines, select_matrices

__all__ = ["SpectralMonitor"]

_SV_KEY = re.compile(r"/sv\d+$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class _Accumulator:
    """Collects metric tensors and transfers them to the host with one ``tolist`` per device."""

    def __init__(self) -> None:
        self._keys: dict[torch.device, list[Hashable]] = defaultdict(list)
        self._vals: dict[torch.device, list[torch.Tensor]] = defaultdict(list)

    def add(self, keys: Sequence[Hashable], values: torch.Tensor) -> None:
        values = values.reshape(-1)
        if len(keys) != values.numel():  # pragma: no cover - internal consistency
            raise AssertionError(f"{len(keys)} keys for {values.numel()} values")
        if not keys:
            return
        self._keys[values.device].extend(keys)
        self._vals[values.device].append(values)

    def collect(self) -> dict[Hashable, float]:
        out: dict[Hashable, float] = {}
        for dev, vals in self._vals.items():
            host = torch.cat(vals).tolist()  # the only device->host transfer / sync
            out.update(zip(self._keys[dev], host))
        return out


def _svd(W: torch.Tensor, vectors: bool):
    """Batched thin SVD (or singular values only); retries on CPU in float64, then NaN."""
    try:
        if vectors:
            return torch.linalg.svd(W, full_matrices=False)
        return (torch.linalg.svdvals(W),)
    except RuntimeError:
        pass
    try:
        W64 = W.detach().to("cpu", torch.float64)
        res = torch.linalg.svd(W64, full_matrices=False) if vectors else (torch.linalg.svdvals(W64),)
        return tuple(t.to(W.device, W.dtype) for t in res)
    except RuntimeError:
        *b, m, n = W.shape
        r = min(m, n)
        nan = float("nan")
        S = W.new_full((*b, r), nan)
        if not vectors:
            return (S,)
        return W.new_full((*b, m, r), nan), S, W.new_full((*b, r, n), nan)


class SpectralMonitor:
    """Periodic SVD of selected weight matrices, with subspace-drift metrics.

    Parameters
    ----------
    model:
        The model (DDP / ``torch.compile`` / timm ``ModelEma`` wrappers are unwrapped).
    targets:
        Module-name patterns (list, or one comma-separated string). A pattern matches
        by substring, or by :func:`fnmatch.fnmatchcase` on the full qualified name when
        it contains ``*``/``?``/``[``. Only matrix modules are kept: ``nn.Linear`` and
        1x1, ``groups=1`` ``nn.Conv1d``/``nn.Conv2d`` (weight reshaped to ``[out, in]``).
        The first matching pattern is the module's *type* (one figure per type).
    topk:
        Size ``k`` of the top and bottom ("last") windows of the spectrum and of the
        top-k / last-k singular subspaces compared between measurements
        (clipped to the rank ``r = min(out, in)`` of each matrix).
    interval:
        Stride of the logged singular-value indices *inside* the k-window (seed:
        "取 2，则记录第 1、3、5... 以及倒数第 1、3、5..."). With ``topk=8, interval=2``
        the logged values are ``sv1, sv3, sv5, sv7`` (0-based indices 0, 2, 4, 6 of the
        descending spectrum) and ``sv_last1, sv_last3, sv_last5, sv_last7``
        (the smallest, 3rd smallest, ...: indices ``r-1, r-3, r-5, r-7``).
    every:
        Measure when ``step % every == 0`` -- *including step 0*, which records the
        initial (baseline) spectrum and subspaces. A step equal to the previously
        measured step is not measured again (returns ``{}``), so calling twice per step
        or resuming at a measured step does not produce a spurious "no change" point.
    on_cpu:
        Copy the weights to CPU before the SVD (relieves the accelerator).
    split_qkv:
        Split fused qkv weights ``[3d, d]`` into ``<name>.q``, ``<name>.k``, ``<name>.v``.
    prefix:
        First component of metric names (``spec``; ``spec_ema`` for an EMA model).
    dtype:
        SVD precision, ``torch.float32`` (default) or ``torch.float64``.
    track_subspaces:
        When ``False`` only singular values are computed (``torch.linalg.svdvals``, no
        vectors, no ``cos_*`` metrics). When ``True`` (default) every measurement uses
        ``torch.linalg.svd(full_matrices=False)``: the vectors are needed either for the
        cosines or to be stored for the next measurement's cosines.

    Metric names
    ------------
    For each monitored matrix ``m`` (its qualified module name, e.g.
    ``blocks.0.attn.qkv``, or ``blocks.0.attn.qkv.q`` with ``split_qkv``), keys are
    ``{prefix}/{m}/<metric>``; singular values ``s_1 >= s_2 >= ... >= s_r``:

    * ``sigma_max`` = ``s_1``;
    * ``sv{i}`` = ``s_i`` and ``sv_last{i}`` = ``s_{r+1-i}`` (``i``-th smallest) for
      ``i`` in ``1, 1+interval, 1+2*interval, ... <= min(topk, r)``;
    * ``delta_sv_rel`` = ``||s_t - s_prev|| / ||s_prev||`` over the full spectrum, since
      the previous measurement of this monitor (absent on the first one);
    * ``cos_u1..cos_uK`` / ``cos_v1..cos_vK`` (``K = min(topk, r)``, all of them, not
      strided): principal cosines (canonical correlations, descending, in [0, 1])
      between the previous and current top-K left / right singular subspaces;
    * ``cos_u_last1..K`` / ``cos_v_last1..K``: the same for the bottom-K subspaces;
    * ``cos_u_max``, ``cos_u_mean``, ``cos_v_max``, ``cos_v_mean``: max / mean of the
      top-K cosines. All ``cos_*`` are absent on the first measurement.

    A matrix containing NaN/Inf yields NaN for all its metrics (no exception); its
    stored previous vectors are then left unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: Sequence[str] | str,
        topk: int = 8,
        interval: int = 2,
        every: int = 100,
        on_cpu: bool = False,
        split_qkv: bool = False,
        prefix: str = "spec",
        dtype: torch.dtype = torch.float32,
        track_subspaces: bool = True,
    ) -> None:
        if topk < 1 or interval < 1 or every < 1:
            raise ValueError(f"topk, interval and every must be >= 1 (got {topk}, {interval}, {every})")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.targets = parse_targets(targets) or []
        self.topk = int(topk)
        self.interval = int(interval)
        self.every = int(every)
        self.on_cpu = bool(on_cpu)
        self.split_qkv = bool(split_qkv)
        self.prefix = prefix
        self.dtype = dtype
        self.track_subspaces = bool(track_subspaces)
        self.entries: list[MatrixEntry] = select_matrices(model, self.targets, split_qkv=split_qkv)
        if not self.entries:
            import warnings

            warnings.warn(f"SpectralMonitor: no matrix module matches targets {self.targets}", stacklevel=2)
        self._sv_idx = list(range(0, self.topk, self.interval))
        # previous measurement per module: S (full spectrum) and top/last-k U, V
        self._prev: dict[str, dict[str, torch.Tensor]] = {}
        self._last_step: int | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ API
    @property
    def module_keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def types(self) -> dict[str, list[str]]:
        """Target pattern -> monitored matrix keys (model order)."""
        out: dict[str, list[str]] = {}
        for e in self.entries:
            out.setdefault(e.pattern, []).append(e.key)
        return out

    def sv_indices(self, rank: int) -> list[int]:
        """1-based singular indices logged as ``sv{i}`` / ``sv_last{i}`` for a rank-``rank`` matrix."""
        k = min(self.topk, rank)
        return [i + 1 for i in self._sv_idx if i < k]

    def should_measure(self, step: int) -> bool:
        return bool(self.entries) and step % self.every == 0 and step != self._last_step

    def maybe_measure(self, step: int) -> dict[str, float]:
        """Metrics at a measuring step (see class docstring), else ``{}`` without any work."""
        if not self.should_measure(step):
            return {}
        return self.measure(step)

    @torch.no_grad()
    def measure(self, step: int) -> dict[str, float]:
        """Measure now, regardless of ``every``; updates history and stored vectors."""
        groups: dict[tuple, list[tuple[MatrixEntry, torch.Tensor]]] = {}
        for e in self.entries:
            W = e.matrix()
            dev = torch.device("cpu") if self.on_cpu else W.device
            groups.setdefault((tuple(W.shape), dev), []).append((e, W))

        acc = _Accumulator()
        new_prev: dict[str, dict[str, torch.Tensor]] = {}
        for (shape, dev), items in groups.items():
            self._measure_group(shape, dev, items, acc, new_prev)

        values = acc.collect()
        metrics = {k: v for k, v in values.items() if isinstance(k, str)}

        # bookkeeping (host side, no further device syncs)
        hist: dict[str, float] = {}
        for e in self.entries:
            m = e.key
            base = f"{self.prefix}/{m}/"
            smax = metrics.get(base + "sigma_max", float("nan"))
            r = new_prev[m]["_rank"]
            k = min(self.topk, r)
            self.last[m] = {
                "step": int(step),
                "type": e.pattern,
                "shape": list(new_prev[m]["_shape"]),
                "sigma_max": smax,
                "sigma_min": values[(m, "sigma_min")],
                "sv_topk": [values[(m, "top", j)] for j in range(k)],
                "sv_lastk": [values[(m, "last", j)] for j in range(k)],
            }
            hist[base + "sigma_max"] = smax
            for i in self.sv_indices(r):
                hist[f"{base}sv{i}"] = metrics[f"{base}sv{i}"]
            state = {kk: v for kk, v in new_prev[m].items() if not kk.startswith("_")}
            if math.isfinite(smax):  # keep the old reference when the weights are broken
                self._prev[m] = state
        self.history.append((int(step), hist))
        self._last_step = int(step)
        return metrics

    # ------------------------------------------------------------ internals
    def _measure_group(self, shape, dev, items, acc: _Accumulator, new_prev) -> None:
        P, dt = self.prefix, self.dtype
        keys = [e.key for e, _ in items]
        W = torch.stack([w.to(device=dev, dtype=dt) for _, w in items])  # [B, o, i]
        finite = torch.isfinite(W).flatten(1).all(1)  # [B]
        W = torch.where(finite[:, None, None], W, torch.zeros((), dtype=dt, device=dev))
        res = _svd(W, self.track_subspaces)
        S = res[1] if self.track_subspaces else res[0]
        nan = torch.full((), float("nan"), dtype=dt, device=dev)
        S = torch.where(finite[:, None], S, nan)
        r = S.shape[-1]
        k = min(self.topk, r)
        idx = [i - 1 for i in self.sv_indices(r)]
        last_idx = [r - 1 - i for i in idx]

        acc.add([f"{P}/{m}/sigma_max" for m in keys], S[:, 0])
        acc.add([f"{P}/{m}/sv{i + 1}" for m in keys for i in idx], S[:, idx])
        acc.add([f"{P}/{m}/sv_last{i + 1}" for m in keys for i in idx], S[:, last_idx])
        acc.add([(m, "sigma_min") for m in keys], S[:, -1])
        acc.add([(m, "top", j) for m in keys for j in range(k)], S[:, :k])
        acc.add([(m, "last", j) for m in keys for j in range(k)], S[:, r - k :])

        # relative change of the full spectrum since the previous measurement
        have = [b for b, m in enumerate(keys) if m in self._prev and self._prev[m]["S"].shape[-1] == r]
        if have:
            S_prev = torch.stack([self._prev[keys[b]]["S"].to(dev, dt) for b in have])
            S_cur = S[have]
            den = torch.linalg.vector_norm(S_prev, dim=-1).clamp_min(torch.finfo(dt).tiny)
            delta = torch.linalg.vector_norm(S_cur - S_prev, dim=-1) / den
            acc.add([f"{P}/{keys[b]}/delta_sv_rel" for b in have], delta)

        cur: dict[str, torch.Tensor] = {}
        if self.track_subspaces:
            U, Vh = res[0], res[2]
            V = Vh.mT
            cur = {
                "U_top": U[..., :k],
                "U_last": U[..., r - k :],
                "V_top": V[..., :k],
                "V_last": V[..., r - k :],
            }
            have_vec = [
                b
                for b in have
                if all(
                    n in self._prev[keys[b]] and tuple(self._prev[keys[b]][n].shape) == tuple(t.shape[1:])
                    for n, t in cur.items()
                )
            ]
            if have_vec:
                ok = finite[have_vec][:, None]
                hk = [keys[b] for b in have_vec]
                for n, tag in (("U_top", "u"), ("V_top", "v"), ("U_last", "u_last"), ("V_last", "v_last")):
                    prev = torch.stack([self._prev[m][n].to(dev, dt) for m in hk])
                    c = principal_cosines(prev, cur[n][have_vec])  # [h, k] descending
                    c = torch.where(ok, c, nan)
                    acc.add([f"{P}/{m}/cos_{tag}{j + 1}" for m in hk for j in range(k)], c)
                    if tag in ("u", "v"):
                        acc.add([f"{P}/{m}/cos_{tag}_max" for m in hk], c.amax(-1))
                        acc.add([f"{P}/{m}/cos_{tag}_mean" for m in hk], c.mean(-1))

        for b, m in enumerate(keys):
            st: dict[str, Any] = {"S": S[b].clone(), "_rank": r, "_shape": shape}
            for n, t in cur.items():
                st[n] = t[b].clone()  # contiguous copy: do not pin the full U/V
            new_prev[m] = st

    # ----------------------------------------------------------- artifacts
    def save_artifacts(self, out_dir: str | Path) -> list[Path]:
        """Write one PNG per target type and ``spectra_last.json``; return the paths.

        PNG ``{prefix}_{type}.png``: left panel ``sigma_max`` vs step, one line per
        module of that type; right panel the logged ``sv{i}`` of the type's last
        (deepest) module vs step. The JSON is ``spectra_last.json`` for the default
        prefix ``spec`` and ``{prefix}_spectra_last.json`` otherwise (so a
        ``spec_ema`` monitor does not overwrite it); per module it holds ``step``,
        ``type``, ``shape``, ``sigma_max``, ``sigma_min``, ``sv_topk`` (``s_1..s_k``)
        and ``sv_lastk`` (``s_{r-k+1}..s_r``, descending) of the last measurement.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        if self.history:
            for typ, mods in self.types.items():
                p = self._plot_type(out, typ, mods)
                if p is not None:
                    paths.append(p)
        name = "spectra_last.json" if self.prefix == "spec" else f"{_SAFE.sub('_', self.prefix)}_spectra_last.json"
        jp = out / name
        payload = {
            "prefix": self.prefix,
            "topk": self.topk,
            "interval": self.interval,
            "every": self.every,
            "last_step": self._last_step,
            "modules": self.last,
        }
        jp.write_text(json.dumps(payload, indent=2, allow_nan=True))
        paths.append(jp)
        return paths

    def _plot_type(self, out: Path, typ: str, mods: list[str]) -> Path | None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        P = self.prefix
        fig = Figure(figsize=(12, 4.5))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        plotted = False
        for m in mods:
            key = f"{P}/{m}/sigma_max"
            pts = [(s, h[key]) for s, h in self.history if key in h]
            if pts:
                xs, ys = zip(*pts)
                ax1.plot(xs, ys, marker="." if len(pts) < 30 else None, label=m)
                plotted = True
        if not plotted:
            return None
        ax1.set_title(f"{P} sigma_max: {typ}")
        ax1.set_xlabel("step")
        ax1.set_ylabel("sigma_max")
        if len(mods) <= 16:
            ax1.legend(fontsize=7)
        last = mods[-1]
        pre = f"{P}/{last}/sv"
        sv_keys = sorted(
            {k for _, h in self.history for k in h if k.startswith(pre) and _SV_KEY.search(k)},
            key=lambda k: int(k[len(pre) :]),
        )
        for key in sv_keys:
            pts = [(s, h[key]) for s, h in self.history if key in h]
            xs, ys = zip(*pts)
            ax2.plot(xs, ys, marker="." if len(pts) < 30 else None, label=key.rsplit("/", 1)[-1])
        ax2.set_title(f"top singular values: {last}")
        ax2.set_xlabel("step")
        if sv_keys and all(h.get(k, 1.0) > 0 for _, h in self.history for k in sv_keys):
            ax2.set_yscale("log")
        if sv_keys:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{_SAFE.sub('_', P)}_{_SAFE.sub('_', typ).strip('_') or 'all'}.png"
        fig.savefig(path, dpi=100)
        return path

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Small resumable state: previous spectra + top/last-k U, V (CPU tensors) and history."""
        return {
            "version": 1,
            "prefix": self.prefix,
            "topk": self.topk,
            "interval": self.interval,
            "last_step": self._last_step,
            "prev": {m: {n: t.detach().cpu() for n, t in st.items()} for m, st in self._prev.items()},
            "history": [[s, dict(h)] for s, h in self.history],
            "last": {m: dict(v) for m, v in self.last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (tensors or nested lists accepted)."""
        self._last_step = state.get("last_step")
        self._prev = {
            m: {n: torch.as_tensor(t, dtype=self.dtype) for n, t in st.items()}
            for m, st in state.get("prev", {}).items()
        }
        self.history = [(int(s), dict(h)) for s, h in state.get("history", [])]
        self.last = {m: dict(v) for m, v in state.get("last", {}).items()}
