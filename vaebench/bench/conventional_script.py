"""pytorch/examples' VAE (``vae/main.py``) as a standalone script (torch, numpy and PIL only,
never vaebench): the conventional process that ``bench --process`` times beside vaebench.

Two substitutions this machine forces: MNIST is read from a data root (no download), and the
``torchvision`` pieces are written out (it does not import with the CPU torch here): a dataset
of uint8 images making each sample a PIL image, then a float tensor (``ToTensor``), and
``save_image``. Per epoch, as the example: train on 60,000 images with a ``loss.item()`` every
step, test on 10,000 (saving 8 reconstructions), save 64 samples of the prior.

    python vaebench/bench/conventional_script.py --data-root ../shared/data --epochs 2
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array of its shape."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class MNIST(Dataset):
    """torchvision's MNIST with ``transforms.ToTensor()``: per sample, uint8 -> PIL -> float."""

    def __init__(self, root: Path, train: bool):
        prefix = "train" if train else "t10k"
        raw = root / "MNIST" / "raw"
        self.data = torch.from_numpy(read_idx(raw / f"{prefix}-images-idx3-ubyte.gz").copy())
        self.targets = torch.from_numpy(read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz").copy())

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index].numpy(), mode="L")
        array = torch.from_numpy(np.array(image, np.uint8, copy=True))
        tensor = array.view(1, 28, 28).to(dtype=torch.get_default_dtype()).div(255)
        return tensor, int(self.targets[index])


def save_image(images: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """torchvision.utils.save_image for (N, 1, 28, 28) images in [0, 1]."""
    n = images.shape[0]
    rows = -(-n // nrow)
    size = 28 + padding
    grid = np.zeros((rows * size + padding, nrow * size + padding), np.uint8)
    pixels = (images[:, 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[padding + r * size : r * size + size, padding + c * size : c * size + size] = pixels[k]
    Image.fromarray(grid).save(path)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def main() -> None:
    parser = argparse.ArgumentParser(description="VAE MNIST Example")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    root = Path(args.data_root)
    train_loader = DataLoader(MNIST(root, True), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(MNIST(root, False), batch_size=args.batch_size, shuffle=False)
    model = VAE().to(device)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    Path("results").mkdir(exist_ok=True)

    for epoch in range(1, args.epochs + 1):
        model.train()
        train_loss = 0.0
        for batch_idx, (data, _) in enumerate(train_loader):
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            if batch_idx % args.log_interval == 0:
                print(
                    f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)}]"
                    f"\tLoss: {loss.item() / len(data):.6f}"
                )
        print(f"====> Epoch: {epoch} Average loss: {train_loss / len(train_loader.dataset):.4f}")
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for i, (data, _) in enumerate(test_loader):
                data = data.to(device)
                recon_batch, mu, logvar = model(data)
                test_loss += loss_function(recon_batch, data, mu, logvar).item()
                if i == 0:
                    n = min(data.size(0), 8)
                    comparison = torch.cat(
                        [data[:n], recon_batch.view(args.batch_size, 1, 28, 28)[:n]]
                    )
                    save_image(comparison.cpu(), f"results/reconstruction_{epoch}.png", nrow=n)
        print(f"====> Test set loss: {test_loss / len(test_loader.dataset):.4f}")
        with torch.no_grad():
            sample = model.decode(torch.randn(64, 20).to(device)).cpu()
            save_image(sample.view(64, 1, 28, 28), f"results/sample_{epoch}.png")


if __name__ == "__main__":
    main()
