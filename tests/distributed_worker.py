"""One rank of data-parallel fits, started by ``tests/test_distributed.py`` (not a test module).

``python distributed_worker.py SPEC_JSON RANK`` joins a gloo process group on
localhost and runs the fits of ``spec["fits"]`` in turn, each
``FGNClassifier(distributed=True, **fit["params"])`` on this rank's shard
``X[bounds[rank]:bounds[rank + 1]]`` of the ``.npz`` in ``spec["data"]``
(``X``, ``y``, ``sample_weight``). Fit ``i`` writes ``{spec["out"]}.{i}.{rank}.npz``:
the fitted parameters, or the error it raised. A fit may ask for
``"partial_fit": k`` calls instead of ``fit``, ``"weighted": true``,
``"nan_rank": r`` (NaN in rank ``r``'s X), ``"rank_params": {"r": {...}}``
(settings of rank ``r`` only) or ``"fail": {"rank": r, "call": k}``
(rank ``r`` raises at its ``k``-th step; the others' next collective then fails;
``"error": "KeyboardInterrupt"`` raises that instead of a RuntimeError, and
``"stay": s`` keeps the failed rank alive ``s`` seconds after its fit),
or ``"tuning": {...}`` (tuning constants for the fit, ``sklearn_fgn.core.tuning_context``).
"""

import datetime
import json
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

torch.set_num_threads(1)


def _inject_failure(call, error):
    import sklearn_fgn._stepper as stepper

    original, calls = stepper.compute_step, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[error](
                "injected failure"
            )
        return original(*args, **kwargs)

    stepper.compute_step = failing


def _fit(fit, data, rank, bounds):
    from sklearn_fgn.core import tuning_context

    with tuning_context(**fit.get("tuning", {})):
        return _fit_shard(fit, data, rank, bounds)


def _fit_shard(fit, data, rank, bounds):
    from sklearn_fgn import FGNClassifier

    rows = slice(bounds[rank], bounds[rank + 1])
    X, y = data["X"][rows], data["y"][rows]
    if fit.get("nan_rank") == rank:
        X = X.copy()
        X[0, 0] = np.nan
    sample_weight = data["sample_weight"][rows] if fit.get("weighted") else None
    fail = fit.get("fail")
    if fail is not None and fail["rank"] == rank:
        _inject_failure(fail["call"], fail.get("error", "RuntimeError"))
    model = FGNClassifier(distributed=True, **fit["params"], **fit.get("rank_params", {}).get(str(rank), {}))
    if fit.get("partial_fit"):
        for _ in range(fit["partial_fit"]):
            model.partial_fit(X, y, classes=np.unique(data["y"]), sample_weight=sample_weight)
    else:
        model.fit(X, y, sample_weight=sample_weight)
    params = model.coefs_ + model.intercepts_ if hasattr(model, "coefs_") else [model.coef_, model.intercept_]
    return {f"param_{i}": p for i, p in enumerate(params)} | {
        "n_iter": model.n_iter_, "t": model.t_, "loss_curve": np.asarray(model.loss_curve_),
        "validation_scores": np.asarray(model.validation_scores_ or [], dtype=float),
    }  # fmt: skip


def main(spec_json, rank):
    spec, rank = json.loads(spec_json), int(rank)
    bounds = spec["bounds"]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=len(bounds) - 1,
        timeout=datetime.timedelta(seconds=spec.get("timeout", 60)),
    )  # fmt: skip
    data = np.load(spec["data"])
    for i, fit in enumerate(spec["fits"]):
        try:
            out = _fit(fit, data, rank, bounds)
        except (Exception, KeyboardInterrupt) as exc:  # recorded for the test, which asserts on it
            out = {"error": np.asarray(f"{type(exc).__name__}: {exc}")}
        out["ended"] = np.asarray(time.time())  # when the fit returned or raised
        np.savez(f"{spec['out']}.{i}.{rank}.npz", **out)
        if fit.get("fail") is not None:
            time.sleep(fit["fail"].get("stay", 0) if fit["fail"]["rank"] == rank else 0)
            sys.exit(1 if "error" in out else 0)  # the group is unusable after a failed collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
