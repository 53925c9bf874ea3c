"""Train a small MLP end to end with FGN steps and with Adam, both through skorch.

The same module (64 -> 64 tanh -> 10 logits) is fitted on standardised sklearn
digits by ``FGNNeuralNetClassifier`` (one damped FGN step per mini-batch) and
by a plain ``skorch.NeuralNetClassifier`` with ``torch.optim.Adam``, with the
same batches per epoch. The script prints test accuracy and seconds for
both and saves the training-loss curves (per epoch and per second) to
``examples/out/skorch_end_to_end.png`` when matplotlib is installed. Runs in
well under a minute on a CPU. Needs skorch: ``pip install -e ".[skorch]"``.
"""

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

try:  # skorch is an optional extra; main() says how to get it
    from skorch import NeuralNetClassifier

    from sklearn_fgn.skorch import FGNNeuralNetClassifier
except ImportError:
    NeuralNetClassifier = FGNNeuralNetClassifier = None

MAX_EPOCHS = 15
BATCH_SIZE = 128
OUT = Path(__file__).parent / "out"


def load():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = (scaler.transform(X).astype(np.float32) for X in (X_train, X_test))
    return X_train, X_test, y_train, y_test


def make_module():
    torch.manual_seed(0)  # both methods start from the same weights
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def make_nets(device):
    common = dict(
        max_epochs=MAX_EPOCHS, batch_size=BATCH_SIZE, train_split=None, iterator_train__shuffle=True,
        device=device, verbose=0,
    )  # fmt: skip
    fgn = FGNNeuralNetClassifier(make_module(), damping=1.0, **common)
    adam = NeuralNetClassifier(
        make_module(), criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=1e-2, **common
    )
    return {"FGN (skorch)": fgn, "Adam (skorch)": adam}


def fit_and_report(name, net, data):
    X_train, X_test, y_train, y_test = data
    torch.manual_seed(0)
    start = time.perf_counter()
    net.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    accuracy, loss = net.score(X_test, y_test), net.history[-1, "train_loss"]
    print(f"{name:14s} test accuracy {accuracy:.4f}  train loss {loss:.4f}  {seconds:.2f} s")
    return np.array(net.history[:, "train_loss"]), np.cumsum(net.history[:, "dur"])


def plot(curves, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, (loss, elapsed) in curves.items():
        by_epoch.semilogy(np.arange(1, len(loss) + 1), loss, marker="o", label=name)
        by_time.semilogy(elapsed, loss, marker="o", label=name)
    by_epoch.set(xlabel="epoch", ylabel="training loss (cross-entropy)")
    by_time.set(xlabel="seconds")
    by_epoch.legend()
    fig.suptitle("digits, MLP 64-64-10 (tanh), batch size 128")
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")


def main():
    if NeuralNetClassifier is None:
        print('this example needs skorch: pip install -e ".[skorch]"')
        return
    # Tiny matmuls: intra-op threads only add synchronisation; pin both methods alike.
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}")
    data = load()
    for net in make_nets(device).values():  # warm-up: torch's one-time start-up costs are nobody's
        net.set_params(max_epochs=1).fit(data[0][:256], data[2][:256])
    curves = {name: fit_and_report(name, net, data) for name, net in make_nets(device).items()}
    plot(curves, OUT / "skorch_end_to_end.png")


if __name__ == "__main__":
    main()
