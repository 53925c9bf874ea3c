"""FGNNeuralNetClassifier: skorch training by the core FGN step."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("skorch")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from skorch.callbacks import Checkpoint, EarlyStopping, EpochScoring  # noqa: E402

from sklearn_fgn._objective import objective  # noqa: E402
from sklearn_fgn._step import compute_step  # noqa: E402
from sklearn_fgn._system import StepOptions
from sklearn_fgn.skorch import FGNNeuralNetClassifier, _make_logits_fn  # noqa: E402

BATCH_KEYS = {"loss", "damping", "cg_iter", "step_norm", "accepted", "step_size", "train_loss"}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    return (
        scaler.transform(X_train).astype(np.float32),
        scaler.transform(X_test).astype(np.float32),
        y_train,
        y_test,
    )


def mlp(*middle, n_in=64, hidden=32, n_out=10, dtype=torch.float32):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(n_in, hidden), *middle, torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)]
    return torch.nn.Sequential(*layers).to(dtype)


def make_net(module, **kwargs):
    kwargs = {"max_epochs": 3, "batch_size": 128, "verbose": 0, "iterator_train__shuffle": True, **kwargs}
    return FGNNeuralNetClassifier(module, **kwargs)


def test_digits_mlp_reaches_95_percent(digits):
    X_train, X_test, y_train, y_test = digits
    net = make_net(mlp(hidden=64), max_epochs=10).fit(X_train, y_train)
    assert net.score(X_test, y_test) >= 0.95
    assert len(net.history) == 10


def _snapshot(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _one_train_step(net, X, y):
    net.initialize()
    net.history.new_epoch()
    net.history.new_batch()
    before = _snapshot(net.module_)
    out = net.train_step((torch.as_tensor(X), torch.as_tensor(y)))
    return before, out


@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
@pytest.mark.parametrize("class_weight", [False, True])
def test_train_step_is_core_compute_step(digits, curvature, class_weight):
    X, y = digits[0][:200].astype(np.float64), digits[2][:200]
    weight = torch.linspace(0.5, 2.0, 10, dtype=torch.float64) if class_weight else None
    net = make_net(
        mlp(dtype=torch.float64), damping=0.3, alpha=1e-2, damping_schedule="constant",
        curvature=curvature, cg_max_iter=15, cg_tol=1e-8, criterion__weight=weight,
    )  # fmt: skip
    before, out = _one_train_step(net, X, y)

    module = mlp(dtype=torch.float64)
    logits_fn = lambda p, X: torch.func.functional_call(module, p, (X,))  # noqa: E731
    y_t = torch.as_tensor(y)
    sample_weight = None if weight is None else weight[y_t]
    ref = compute_step(
        logits_fn,
        before,
        torch.as_tensor(X),
        y_t,
        sample_weight,
        StepOptions(
            alpha=1e-2 / len(y), damping=0.3, curvature=curvature, solver="cg", cg_tol=1e-8, cg_max_iter=15
        ),
    )
    for name, param in net.module_.named_parameters():
        assert torch.equal(param.detach(), before[name] + ref.step[name])  # bit for bit
    assert float(out["loss"]) == float(ref.loss)
    torch.testing.assert_close(out["y_pred"], ref.logits, rtol=0, atol=0)


def _ignored_labels(y, ignore_index):
    # ignore_index=2 drops a real class; -100 marks every 7th row unlabelled.
    y = y.copy()
    if ignore_index == -100:
        y[::7] = -100
    return y


@pytest.mark.parametrize("ignore_index", [2, -100])
@pytest.mark.parametrize("class_weight", [False, True])
def test_ignored_rows_drop_out_of_the_step_as_in_torch(digits, ignore_index, class_weight):
    X, y = digits[0][:200].astype(np.float64), _ignored_labels(digits[2][:200], ignore_index)
    weight = torch.linspace(0.5, 2.0, 10, dtype=torch.float64) if class_weight else None
    settings = {"damping": 0.3, "cg_tol": 1e-10, "cg_max_iter": 15}
    net = make_net(
        mlp(dtype=torch.float64), damping_schedule="constant", criterion__weight=weight,
        criterion__ignore_index=ignore_index, **settings,
    )  # fmt: skip
    before, out = _one_train_step(net, X, y)

    module = mlp(dtype=torch.float64)
    logits_fn = lambda p, X: torch.func.functional_call(module, p, (X,))  # noqa: E731
    X_t, y_t = torch.as_tensor(X), torch.as_tensor(y)
    torch_loss = torch.nn.CrossEntropyLoss(weight, ignore_index=ignore_index)(logits_fn(before, X_t), y_t)
    torch.testing.assert_close(out["loss"], torch_loss, rtol=1e-12, atol=0)
    assert net.history[-1, "batches", -1, "loss"] == pytest.approx(float(torch_loss), rel=1e-12)
    # The step is the one on the labelled rows alone.
    kept = y_t != ignore_index
    sample_weight = None if weight is None else weight[y_t[kept]]
    ref = compute_step(
        logits_fn, before, X_t[kept], y_t[kept], sample_weight, StepOptions(solver="cg", **settings)
    )
    for name, param in net.module_.named_parameters():
        torch.testing.assert_close(param.detach(), before[name] + ref.step[name], rtol=1e-9, atol=1e-12)


def test_fit_with_ignore_index_rarely_predicts_the_ignored_class(digits):
    X_train, X_test, y_train, y_test = digits
    net = make_net(mlp(hidden=64), max_epochs=5, criterion__ignore_index=2).fit(X_train, y_train)
    predicted = net.predict(X_test)
    assert np.mean(predicted == 2) < 0.01  # class 2 is 10 % of the test set
    assert np.mean(predicted[y_test != 2] == y_test[y_test != 2]) >= 0.95


def test_batch_with_every_row_ignored_raises(digits):
    y = np.full(len(digits[2]), -100)
    with pytest.raises(ValueError, match="Every row of the batch has y == ignore_index"):
        make_net(mlp()).fit(digits[0], y)


def test_alpha_penalizes_weights_not_biases(digits):
    X, y = torch.as_tensor(digits[0][:50]).double(), torch.as_tensor(digits[2][:50])
    module = mlp(dtype=torch.float64)
    params = {k: p.detach() for k, p in module.named_parameters()}
    logits_fn = lambda p, X: torch.func.functional_call(module, p, (X,))  # noqa: E731
    plain = compute_step(logits_fn, params, X, y, None, StepOptions(alpha=0.0, solver="cg", cg_max_iter=1))
    penalized = compute_step(
        logits_fn, params, X, y, None, StepOptions(alpha=0.5, solver="cg", cg_max_iter=1)
    )
    for name, t in params.items():
        expected = 0.5 * t if t.ndim >= 2 else torch.zeros_like(t)
        torch.testing.assert_close(penalized.gradient[name] - plain.gradient[name], expected)


@pytest.mark.parametrize("damping", [0.05, 1.0])  # reduction ratios 0.37 and 0.92 on this batch
def test_adaptive_schedule_accepts_or_restores(digits, damping):
    X, y = digits[0][:256], digits[2][:256]
    net = make_net(mlp(), damping=damping, cg_max_iter=30)
    before, out = _one_train_step(net, X, y)
    row = net.history[-1, "batches", -1]
    after = _snapshot(net.module_)
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == row["accepted"]
    # A ratio below 0.25 doubles the damping; any other keeps it, since on
    # mini-batches it never drops below damping (a ratio above 0.75 would divide it by 10).
    assert row["damping"] == damping and net.damping_ in (2 * damping, damping)
    assert row["accepted"] or net.damping_ == 2 * damping  # a rejected step raises the damping


def test_overshooting_step_is_cut_back_like_the_core(digits):
    # Tiny damping on 64 rows and ~2400 parameters: the full step raises the
    # batch objective; the net takes the Armijo fraction the core would.
    X, y = digits[0][:64].astype(np.float64), digits[2][:64]
    net = make_net(mlp(dtype=torch.float64), damping=1e-4, cg_max_iter=50, cg_tol=1e-10)
    before, out = _one_train_step(net, X, y)
    row = net.history[-1, "batches", -1]
    module = mlp(dtype=torch.float64)
    logits_fn = lambda p, X: torch.func.functional_call(module, p, (X,))  # noqa: E731
    X_t, y_t = torch.as_tensor(X), torch.as_tensor(y)
    ref = compute_step(
        logits_fn,
        before,
        X_t,
        y_t,
        None,
        StepOptions(damping=1e-4, solver="cg", cg_tol=1e-10, cg_max_iter=50),
    )
    weights = torch.full((64,), 1 / 64, dtype=torch.float64)

    def f(t):
        trial = {k: before[k] + t * ref.step[k] for k in before}
        return float(objective(logits_fn, trial, X_t, y_t, weights, 0.0))

    assert f(1.0) > f(0.0)  # the full step overshoots
    slope = sum(float((ref.gradient[k] * ref.step[k]).sum()) for k in before)
    t = next(0.5**j for j in range(1, 11) if f(0.5**j) <= f(0.0) + 1e-4 * 0.5**j * slope)
    assert row["accepted"] and row["step_size"] == t < 1.0
    for name, param in net.module_.named_parameters():
        torch.testing.assert_close(param.detach(), before[name] + t * ref.step[name], rtol=1e-12, atol=1e-14)
    assert net.damping_ == 2e-4  # the damping still grows after the bad full step


@pytest.mark.parametrize(
    ("criterion", "match"),
    [
        (torch.nn.NLLLoss, "NLLLoss"),
        (torch.nn.MSELoss, "MSELoss"),
        (torch.nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
        (torch.nn.CrossEntropyLoss(reduction="sum"), "reduction"),
        (torch.nn.CrossEntropyLoss(weight=torch.tensor([-1.0] + [1.0] * 9)), "non-negative"),
        (torch.nn.CrossEntropyLoss(weight=torch.zeros(10)), "positive sum"),
    ],
)
def test_other_criteria_raise(digits, criterion, match):
    with pytest.raises(ValueError, match=match):
        make_net(mlp(), criterion=criterion).fit(digits[0], digits[2])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"solver": "cholesky"}, "cholesky"),
        ({"damping": 0.0}, "damping"),
        ({"damping_schedule": "linear"}, "damping_schedule"),
        ({"curvature": "kfac"}, "curvature"),
        ({"cg_max_iter": 0}, "cg_max_iter"),
        ({"alpha": -1.0}, "alpha"),
        ({"cg_tol": 1.0}, r"cg_tol must be a float in \[0, 1\)"),  # CG would stop at once: zero steps
        ({"cg_tol": 5.0}, r"cg_tol must be a float in \[0, 1\)"),
        ({"damping": True}, "damping"),  # bool is a Real and an Integral in Python
        ({"cg_max_iter": True}, "cg_max_iter"),
        ({"alpha": True}, "alpha"),
    ],
)
def test_bad_settings_raise(digits, params, match):
    with pytest.raises(ValueError, match=match):
        make_net(mlp(), **params).fit(digits[0], digits[2])


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (lambda y: y + 1, {}, r"y must be in \[0, n_classes\) = \[0, 10\).*got 10"),
        (lambda y: y - 1, {}, r"class indices >= 0.*got -1"),
        (lambda y: y + 0.7, {}, r"non-integer value [012]\.7"),
        (lambda y: y, {"criterion__weight": torch.ones(9)}, "criterion__weight has 9 entries"),
        (lambda y: y, {"criterion__weight": torch.ones(11)}, "criterion__weight has 11 entries"),
    ],
)
def test_invalid_labels_and_class_weights_raise(digits, labels, kwargs, match):
    X, y = digits[0][:200], digits[2][:200]
    with pytest.raises(ValueError, match=match):
        make_net(mlp(), **kwargs).fit(X, labels(y))


def test_whole_number_float_labels_train_like_integer_labels(digits):
    X, y = digits[0][:300], digits[2][:300]
    fits = [
        _snapshot(make_net(mlp(), max_epochs=2).fit(X, labels).module_) for labels in (y, y.astype(float))
    ]
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


def test_single_logit_module_raises(digits):
    with pytest.raises(ValueError, match="n_classes >= 2"):
        make_net(mlp(n_out=1)).fit(digits[0], (digits[2] > 4).astype(np.int64))


class _TupleModule(torch.nn.Module):
    """Returns (logits, features), as some modules do."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, X):
        return self.linear(X), X


def _frozen_mlp():
    module = mlp()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (_frozen_mlp, "no trainable parameters"),
        (_TupleModule, "must return a Tensor of logits; got tuple"),
    ],
)
def test_unusable_modules_raise_clear_errors(digits, module, match):
    with pytest.raises(ValueError, match=match):
        make_net(module()).fit(digits[0], digits[2])


def test_dropout_trains_with_one_mask_per_step(digits):
    X_train, X_test, y_train, y_test = digits
    fits = []
    for _ in range(2):
        torch.manual_seed(1)
        net = make_net(mlp(torch.nn.Dropout(0.2), hidden=64), max_epochs=4).fit(X_train, y_train)
        fits.append(_snapshot(net.module_))
    assert net.score(X_test, y_test) >= 0.9
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])  # seeded from torch's generator


def test_dropout_mask_is_replayed_within_a_step():
    # Every forward pass of one step (primal, JVPs, acceptance test) sees the same mask,
    # so the step linearises one function; the next step draws a new seed.
    module = mlp(torch.nn.Dropout(0.5)).train()
    params = {k: p.detach() for k, p in module.named_parameters()}
    X = torch.randn(20, 64)
    cpu = torch.device("cpu")
    logits_fn = _make_logits_fn(module, {}, 3, cpu)
    state = torch.get_rng_state()
    first = logits_fn(params, X)
    assert torch.equal(first, logits_fn(params, X))
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
    tangent = {k: torch.ones_like(t) for k, t in params.items()}
    primal, _ = torch.func.jvp(lambda p: logits_fn(p, X), (params,), (tangent,))
    assert torch.equal(primal, first)
    assert not torch.equal(first, _make_logits_fn(module, {}, 4, cpu)(params, X))


def test_batchnorm_trains_and_updates_running_stats_once_per_batch(digits):
    X_train, X_test, y_train, y_test = digits
    net = make_net(mlp(torch.nn.BatchNorm1d(32)), max_epochs=3).fit(X_train, y_train)
    bn = net.module_[1]
    n_batches = 3 * int(np.ceil(len(X_train) / 128))
    assert int(bn.num_batches_tracked) == n_batches
    assert bn.track_running_stats and float(bn.running_mean.abs().sum()) > 0
    assert net.score(X_test, y_test) >= 0.9


class _CountingModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, X):
        self.calls.add_(1)
        return self.linear(X)


def test_buffer_mutation_raises_clear_error(digits):
    with pytest.raises(ValueError, match="changes a buffer in place"):
        make_net(_CountingModule()).fit(digits[0], digits[2])


def test_history_has_per_batch_diagnostics(digits):
    net = make_net(mlp(), max_epochs=2).fit(digits[0], digits[2])
    for row in net.history[:, "batches"]:
        for batch in row:
            assert BATCH_KEYS <= set(batch)
            assert batch["damping"] > 0 and batch["step_norm"] >= 0 and batch["cg_iter"] >= 1


def test_frozen_parameters_stay_frozen(digits):
    module = mlp()
    module[0].weight.requires_grad_(False)
    frozen = module[0].weight.detach().clone()
    net = make_net(module, max_epochs=1).fit(digits[0], digits[2])
    assert torch.equal(net.module_[0].weight, frozen)
    assert not torch.equal(net.module_[2].weight, mlp()[2].weight)


def test_skorch_callbacks(digits, tmp_path):
    callbacks = [
        EpochScoring("accuracy", on_train=True, name="train_acc", lower_is_better=False),
        EarlyStopping(monitor="train_loss", patience=2),
        Checkpoint(monitor="train_loss_best", dirname=str(tmp_path)),
    ]
    net = make_net(mlp(), max_epochs=3, callbacks=callbacks).fit(digits[0], digits[2])
    assert net.history[-1, "train_acc"] > 0.9
    assert (tmp_path / "params.pt").exists()
    restored = make_net(mlp()).initialize()
    restored.load_params(f_params=str(tmp_path / "params.pt"))
    assert restored.predict(digits[1]).shape == digits[3].shape


def test_set_params_and_grid_search_over_damping(digits):
    X, y = digits[0][:600], digits[2][:600]
    settings = {"max_epochs": 2, "damping_schedule": "constant", "iterator_train__shuffle": False}
    net = make_net(mlp(), **settings)
    net.set_params(damping=0.5).fit(X, y)
    assert net.damping_ == 0.5 and set(net.history[-1, "batches", :, "damping"]) == {0.5}
    # A fresh net: clone would copy the module instance that fit just trained.
    search = GridSearchCV(make_net(mlp(), **settings), {"damping": [0.1, 1.0]}, cv=2).fit(X, y)
    # Unshuffled batches make each fit deterministic: a candidate scores exactly
    # as a net built with its damping, and the two scores differ (no tie to break).
    explicit = [cross_val_score(make_net(mlp(), damping=d, **settings), X, y, cv=2).mean() for d in [0.1, 1]]
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], explicit)
    assert abs(explicit[0] - explicit[1]) >= 0.02
    assert search.best_params_["damping"] == (0.1, 1.0)[int(np.argmax(explicit))]
    assert search.best_estimator_.damping == search.best_params_["damping"]


@pytest.mark.parametrize("how", ["partial_fit", "warm_start_fit"])
@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"curvature": "kfac"}, "curvature"),
        ({"damping": -1.0}, "damping"),
        ({"damping_schedule": "nonsense"}, "damping_schedule"),
        ({"cg_tol": -5.0}, "cg_tol"),
        ({"alpha": -3.0}, "alpha"),
    ],
)
def test_settings_changed_after_fit_are_checked_before_training(digits, how, params, match):
    X, y = digits[0][:300], digits[2][:300]
    net = make_net(mlp(), max_epochs=1, warm_start=how == "warm_start_fit").fit(X, y)
    fitted = _snapshot(net.module_)
    net.set_params(**params)
    with pytest.raises(ValueError, match=match):
        net.partial_fit(X, y) if how == "partial_fit" else net.fit(X, y)
    after = _snapshot(net.module_)
    assert all(torch.equal(fitted[k], after[k]) for k in fitted)  # no step was taken
    assert len(net.history) == 1


def test_set_params_damping_resets_the_adapted_damping(digits):
    X, y = digits[0][:600], digits[2][:600]
    net = make_net(mlp(), max_epochs=2).fit(X, y)
    assert net.damping_ >= 1.0  # mini-batch damping never goes below damping=1.0
    net.set_params(damping=0.01)
    assert net.damping_ == 0.01
    net.partial_fit(X, y)
    assert net.history[2, "batches", 0, "damping"] == 0.01  # first step of partial_fit


def test_pickle_round_trip_predicts_identically(digits):
    net = make_net(mlp(), max_epochs=1).fit(digits[0], digits[2])
    loaded = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(loaded.predict_proba(digits[1]), net.predict_proba(digits[1]))
    assert loaded.damping_ == net.damping_


def test_cuda(digits):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    X_train, X_test, y_train, y_test = digits
    net = make_net(mlp(hidden=64), max_epochs=5, device="cuda").fit(X_train, y_train)
    assert next(net.module_.parameters()).is_cuda
    assert net.score(X_test, y_test) >= 0.9


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_package_does_not_import_skorch_and_missing_skorch_is_explained():
    code = (
        "import sys, sklearn_fgn; assert 'skorch' not in sys.modules, 'sklearn_fgn imported skorch'; "
        "sys.modules['skorch'] = None; import sklearn_fgn.skorch"
    )
    stderr = _run(code).stderr
    assert "ImportError: sklearn_fgn.skorch needs skorch" in stderr, stderr


class _TokenBag(torch.nn.Module):
    """Integer token ids -> mean embedding -> logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(40, 3)

    def forward(self, X):
        return self.embed(X).mean(1)


class _TwoInputs(torch.nn.Module):
    """Two named inputs, as skorch passes a dict of arrays."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(2, 3)

    def forward(self, xa, xb):
        return self.a(xa) + self.b(xb)


def _exact_losses(net, X, y):
    # The recorded objective before each step, against cross-entropy of the
    # module at the end: training must lower it.
    with torch.no_grad():
        return net.history[:, "train_loss"], float(net.get_loss(net.infer(X), torch.as_tensor(y)))


def test_integer_inputs_train_like_float_inputs():
    # The example weights once took X's dtype: int64 ids made every trial
    # objective 0, so every step was accepted and the loss diverged.
    rng = np.random.default_rng(0)
    X = rng.integers(0, 40, size=(300, 5))
    y = X[:, 0] % 3
    net = make_net(_TokenBag(), batch_size=-1, damping=1e-3, max_epochs=6).fit(X, y)
    losses, final = _exact_losses(net, X, y)
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False)), losses
    assert final < 0.9 * losses[0]


def test_dict_inputs_are_passed_by_name():
    rng = np.random.default_rng(0)
    X = {
        "xa": rng.normal(size=(200, 4)).astype(np.float32),
        "xb": rng.normal(size=(200, 2)).astype(np.float32),
    }
    y = (X["xa"][:, 0] + X["xb"][:, 1] > 0).astype(np.int64) + (X["xa"][:, 1] > 1)
    net = make_net(_TwoInputs(), batch_size=-1, max_epochs=5).fit(X, y)
    losses, final = _exact_losses(net, X, y)
    assert final < 0.8 * losses[0]
    assert net.score(X, y) >= 0.8  # the objective's optimum (loss 0.4063) scores 0.80


def test_zero_cg_tol_runs_cg_max_iter_iterations(digits):
    # float64: CG's round-off stop ("stagnated") stays out of the way.
    X, y = digits[0][:256].astype(np.float64), digits[2][:256]
    net = make_net(mlp(dtype=torch.float64), max_epochs=1, batch_size=-1, cg_tol=0.0, cg_max_iter=7)
    assert net.fit(X, y).history[-1, "batches", 0, "cg_iter"] == 7


@pytest.mark.parametrize(
    ("batch_size", "explicit"),
    [
        (128, {"curvature": "fgn", "cg_tol": 1e-2, "cg_max_iter": 100}),  # mini-batches
        (-1, {"curvature": "ggn", "cg_tol": 0.5, "cg_max_iter": 1000}),  # full batch, first step: eta = 0.5
    ],
)
def test_auto_step_settings_mean_what_they_mean_for_fgnclassifier(digits, batch_size, explicit):
    """The net's defaults are FGNClassifier's "auto" rules (sklearn_fgn._stepper), resolved per step."""
    X_train, _, y_train, _ = digits
    X, y = X_train[:256], y_train[:256]
    auto = make_net(
        mlp(dtype=torch.float64), batch_size=batch_size, max_epochs=1, iterator_train__shuffle=False
    )
    fixed = make_net(
        mlp(dtype=torch.float64),
        batch_size=batch_size,
        max_epochs=1,
        iterator_train__shuffle=False,
        **explicit,
    )
    assert (auto.curvature, auto.cg_tol, auto.cg_max_iter) == ("auto", "auto", "auto")
    auto.fit(X.astype(np.float64), y)
    fixed.fit(X.astype(np.float64), y)
    for (name, a), (_, b) in zip(
        auto.module_.named_parameters(), fixed.module_.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert auto.history[-1, "batches", 0, "cg_iter"] == fixed.history[-1, "batches", 0, "cg_iter"]


def test_full_batch_auto_forcing_term_tightens_as_the_fit_converges(digits):
    """A linear module in full batch: inexact Newton, loose far from the optimum and tight near it."""
    X_train, _, y_train, _ = digits
    torch.manual_seed(0)
    module = torch.nn.Linear(64, 10).double()
    net = make_net(module, batch_size=-1, max_epochs=12, alpha=1.0).fit(X_train.astype(np.float64), y_train)
    assert net._step_state.last_relative_decrease < 1e-6  # what the next step's forcing term reads
    cg = [net.history[i, "batches", 0, "cg_iter"] for i in range(12)]
    assert cg[0] <= 3 and max(cg[-3:]) > 3 * cg[0], cg


def test_train_step_outside_fit_needs_no_history_row(digits):
    # Issue 35: train_step outside fit (as its docstring allows): without a batch row it records nothing.
    X_train, _, y_train, _ = digits
    net = make_net(mlp(hidden=8))
    net.initialize()
    before = _snapshot(net.module_)
    out = net.train_step((torch.as_tensor(X_train[:64]), torch.as_tensor(y_train[:64])))
    assert np.isfinite(float(out["loss"]))
    assert len(net.history) == 0
    assert any(not torch.equal(before[k], p) for k, p in net.module_.named_parameters())
