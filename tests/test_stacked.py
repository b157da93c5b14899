"""A stack of K runs trains each member exactly as the run alone (vaebench.training.loop.fit)
would."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from vaebench.data import Split, Splits, load_splits
from vaebench.models.losses import expected_reconstruction, reconstruction
from vaebench.scoring.evaluation import evaluate
from vaebench.spec.config import RunConfig
from vaebench.stacking.evaluation import evaluate_stack
from vaebench.stacking.fit import build_member, fit_stack
from vaebench.stacking.layers import StackedSequential
from vaebench.stacking.model import StackedGaussianVAE
from vaebench.stacking.optim import STACKED_OPTIMIZERS
from vaebench.stacking.plan import STACKED_OPTIMIZER_NAMES, config_problem, stack_key
from vaebench.training.loop import MemberStopped, fit
from vaebench.training.trainer import TrainingDiverged, TrainResult

CPU = torch.device("cpu")
FAMILIES = {
    "mlp": {"arch": "mlp", "hidden": [64, 32], "z_dim": 4},
    "conv": {"arch": "conv", "channels": [8, 16], "dense": [32], "z_dim": 4},
    # the label joins the decoder's input and the encoder's features
    "cvae": {"arch": "cvae", "hidden": [64, 32], "z_dim": 4, "condition_encoder": True},
    # a relaxed category whose temperature anneals, soft in both directions
    "gumbel": {"arch": "gumbel", "hidden": [64, 32], "z_dim": 4, "categories": 10,
               "tau": [1.0, 0.5], "hard": False},
}
FAMILIES["gmvae"] = {"arch": "gmvae", "hidden": [64, 32], "z_dim": 4, "categories": 5}
# batch norm after each convolution: per-member batch statistics and running statistics
FAMILIES["conv-bn"] = {**FAMILIES["conv"], "batch_norm": True}
# straight-through one-hot categories at a fixed temperature
GUMBEL_HARD = {**FAMILIES["gumbel"], "tau": 0.67, "hard": True}
# JointVAE's capacity objective, its targets rising over the four steps of a test's training
CAPACITY = {"objective": "capacity", "gamma": 30.0, "capacity_z": 5.0, "capacity_c": 1.0,
            "capacity_steps": 3}
# the importance-weighted bound, five draws per image (its KL weight is no member setting)
IWAE = {"objective": "iwae", "iwae_k": 5, "beta": 1.0}
# K = 4 members differing in seed, beta and learning rate
MEMBERS = [(0, 1.0, 1e-3), (1, 4.0, 3e-3), (2, 0.5, 5e-4), (3, 1.0, 2e-3)]


def member_configs(
    model: dict, images: int, batch_size: int, epochs: int, recon: str = "bce",
    loss: dict | None = None, **data
):
    """The K = 4 members; ``recon`` ``mixed``: bce and mse members alternate; ``loss``: the
    members' other loss settings."""
    kinds = ["bce", "mse"] if recon == "mixed" else [recon]
    return [
        RunConfig.model_validate({
            "data": {"subset": images, "validation": 300, **data},
            "model": model,
            "loss": {"beta": beta, "recon": kinds[seed % len(kinds)], **(loss or {})},
            "optim": {"lr": lr},
            "train": {"epochs": epochs, "batch_size": batch_size, "device": "cpu"},
            "seed": seed,
        })
        for seed, beta, lr in MEMBERS
    ]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def float64():
    """Models and data in float64, where the batched products' rounding is far below what a
    wrong gradient, batch or random draw would change. (In float32 a grouped convolution
    rounds differently from one model's, and Adam's first step, lr * g / (|g| + eps), turns a
    gradient that is 0 in one and 1e-10 in the other into a visible share of lr: parameters
    after one step then differ by up to 2e-4 of their scale, a difference of rounding only.)"""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def in_float64(splits: Splits) -> Splits:
    def cast(split: Split | None) -> Split | None:
        return None if split is None else Split(split.images.double(), split.labels)

    return replace(splits, train=cast(splits.train), validation=cast(splits.validation),
                   test=cast(splits.test))


# a net with convolutions runs per member on the CPU, batched (grouped convolutions) on CUDA
LAYOUTS = {"per-member": True, "grouped": False}


@pytest.fixture(params=sorted(LAYOUTS))
def conv_layout(request, monkeypatch):
    """Each layout of a stack's nets, tested here on the CPU."""
    monkeypatch.setattr(StackedSequential, "per_member", LAYOUTS[request.param])
    return request.param


@pytest.mark.parametrize(
    ("model", "binarize", "recon", "optimizer", "loss", "layout"),
    [(FAMILIES["mlp"], "none", "bce", "adam", {}, None),
     (FAMILIES["mlp"], "dynamic", "mixed", "rmsprop", {}, None),
     (FAMILIES["conv"], "none", "mse", "adam", {}, True),
     (FAMILIES["conv"], "dynamic", "mixed", "rmsprop", {}, True),
     (FAMILIES["conv"], "none", "mse", "adam", {}, False),
     (FAMILIES["conv"], "dynamic", "mixed", "rmsprop", {}, False),
     (FAMILIES["cvae"], "dynamic", "mixed", "adam", {}, None),
     (FAMILIES["gumbel"], "dynamic", "mixed", "adam", {"beta_c": 2.0}, None),  # batch-marginal
     (GUMBEL_HARD, "none", "bce", "rmsprop", {"kl_c": "per_image"}, None),
     (FAMILIES["gmvae"], "dynamic", "mixed", "adam", {"beta_c": 2.0}, None),  # batch-marginal
     (FAMILIES["gmvae"], "none", "bce", "rmsprop", {"kl_c": "per_image"}, None),
     (FAMILIES["gumbel"], "dynamic", "mixed", "adam", CAPACITY, None),
     (FAMILIES["mlp"], "none", "mixed", "rmsprop", CAPACITY, None),
     (FAMILIES["mlp"], "dynamic", "bce", "adam", IWAE, None),
     (FAMILIES["conv"], "dynamic", "bce", "rmsprop", IWAE, True)],
    ids=["mlp", "mlp-dynamic", "conv-per-member", "conv-dynamic-per-member", "conv-grouped",
         "conv-dynamic-grouped", "cvae", "gumbel", "gumbel-hard", "gmvae", "gmvae-per-image",
         "gumbel-capacity", "mlp-capacity", "mlp-iwae", "conv-iwae"],
)
def test_a_stacks_steps_are_each_members_own_steps(
    model, binarize, recon, optimizer, loss, layout, mnist_root, float64, monkeypatch
):
    monkeypatch.setattr(StackedSequential, "per_member", layout)
    # two epochs of two batches: four optimizer steps, two batch orders, every random draw
    configs = [
        RunConfig.model_validate({**c.model_dump(), "optim": {"name": optimizer, "lr": c.optim.lr}})
        for c in member_configs(model, 200, 100, 2, recon, loss, binarize=binarize)
    ]
    splits = in_float64(load_splits(configs[0].data, mnist_root, CPU))
    # the stacked evaluation (the default on CUDA) here, for the families that have one (gumbel
    # and gmvae members are evaluated alone on every device); the CPU's default below
    stacked = fit_stack(configs, splits, CPU, stacked_evaluation=True)
    for config, member in zip(configs, stacked, strict=True):
        assert isinstance(member, TrainResult)
        alone = fit(config, splits, CPU)
        # each ends in eval mode, as its last evaluation leaves a run alone: the scores and
        # pictures after training then use batch norm's running statistics, not a batch's
        assert not member.model.training and not alone.model.training
        mine, theirs = member.model.state_dict(), alone.model.state_dict()
        assert mine.keys() == theirs.keys()
        for name in theirs:
            assert mine[name].dtype == torch.float64
            assert relative_difference(mine[name], theirs[name]) < 1e-10, (config.seed, name)
        for mine_epoch, their_epoch in zip(member.history, alone.history, strict=True):
            assert mine_epoch.train_loss == pytest.approx(their_epoch.train_loss, rel=1e-10)
            assert mine_epoch.values == pytest.approx(their_epoch.values, rel=1e-10)
            assert {"val_mi", "val_active_units"} <= their_epoch.values.keys()  # collapse too
        assert member.kl_per_dimension.split == alone.kl_per_dimension.split == "validation"
        assert member.kl_per_dimension.nats == pytest.approx(alone.kl_per_dimension.nats,
                                                             rel=1e-10)
        scores = {k: v for k, v in alone.summary.items() if "second" not in k}  # not timing
        assert {k: member.summary[k] for k in scores} == pytest.approx(scores, rel=1e-9)


def rounding_driven_tensors(net: torch.nn.Module) -> set[str]:
    """The biases of the convolutions a batch norm follows, and the running means that carry
    them: their gradient is zero up to rounding (see below)."""
    followed = {  # convolutions a batch norm follows, and those batch norms
        f"{part}.{index}": f"{part}.{index + 1}"
        for part in ("encoder", "decoder")
        for index, layer in enumerate(getattr(net, part)[:-1])
        if isinstance(getattr(net, part)[index + 1], torch.nn.BatchNorm2d)
    }
    return {f"{conv}.bias" for conv in followed} | {
        f"{norm}.running_mean" for norm in followed.values()
    }


def test_a_stacks_batch_norm_steps_are_each_members_own(conv_layout, mnist_root, float64):
    """With batch norm after each convolution, every member's tensors equal its run alone's to
    1e-10 after four steps, but the biases of those convolutions and the running means that
    carry them: the batch norm removes any constant, so those biases' gradient is zero up to
    rounding (checked below), and Adam makes a step of lr * g / (|g| + eps) out of that
    rounding, which differs between the stack and the run alone. (The same happens between two
    runs alone with another thread count: in float32, 2 epochs on 2,000 images, a run's test
    ELBO moved by up to 1.45 nats from 2 threads to 1, and its stacked twin stayed within that
    spread; without batch norm all three agreed to 0.015 nats.)"""
    configs = member_configs(FAMILIES["conv-bn"], 200, 100, 2, "mixed", binarize="dynamic")
    splits = in_float64(load_splits(configs[0].data, mnist_root, CPU))
    stacked = fit_stack(configs, splits, CPU)
    alone_models = []
    for config, member in zip(configs, stacked, strict=True):
        alone = fit(config, splits, CPU)
        alone_models.append(alone.model)
        rounding_driven = rounding_driven_tensors(alone.model)
        assert len(rounding_driven) == 6  # 2 encoder and 1 decoder batch norms
        mine, theirs = member.model.state_dict(), alone.model.state_dict()
        for name in theirs.keys() - rounding_driven:
            if theirs[name].dtype.is_floating_point:
                assert relative_difference(mine[name], theirs[name]) < 1e-10, (config.seed, name)
            else:
                assert torch.equal(mine[name], theirs[name]), name  # batches tracked
        for mine_epoch, their_epoch in zip(member.history, alone.history, strict=True):
            assert mine_epoch.train_loss == pytest.approx(their_epoch.train_loss, rel=1e-10)
    net, config = alone_models[0], configs[0]
    net.train()
    x = splits.train.images[:100]
    out = net(x)
    (out.logits.sigmoid() - x).pow(2).sum().add(out.mu.pow(2).sum()).backward()
    scale = max(p.grad.abs().max() for p in net.parameters())
    for name, parameter in net.named_parameters():
        if name in rounding_driven:
            assert parameter.grad.abs().max() < 1e-12 * scale, name


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gumbel", "gmvae"}))  # alone
def test_a_stacked_evaluation_is_each_members_own(family, mnist_root, float64):
    # three draws per image, in chunks of 40 images: the split's draws, repeated and chunked
    # as evaluate() does, serve every member
    configs = [
        c.model_copy(update={
            "eval": c.eval.model_copy(update={"samples": 3}),
            "train": c.train.model_copy(update={"eval_batch_size": 120}),
        })
        for c in member_configs(FAMILIES[family], 100, 50, 1, recon="mixed")
    ]
    splits = in_float64(load_splits(configs[0].data, mnist_root, CPU))
    members = [build_member(config, splits, CPU) for config in configs]
    stack = StackedGaussianVAE([m.model for m in members])
    for split_name, split in (("validation", splits.validation), ("test", splits.test)):
        stacked = evaluate_stack(stack, split, split_name, configs)
        for member, mine in zip(members, stacked, strict=True):
            alone = evaluate(member.model, split, split_name, member.config)
            assert float(mine.recon) == pytest.approx(float(alone.recon), rel=1e-12)
            assert float(mine.kl["kl_z"]) == pytest.approx(float(alone.kl["kl_z"]), rel=1e-12)
            assert relative_difference(mine.mu, alone.mu) < 1e-12
            # the collapse diagnostics: one member's draws serve all, as for the ELBO
            assert float(mine.mi) == pytest.approx(float(alone.mi), rel=1e-12, abs=1e-12)
            assert int(mine.active_units) == int(alone.active_units)
            mine_kl, their_kl = mine.kl_per_dimension(), alone.kl_per_dimension()
            assert mine_kl.split == their_kl.split == split_name
            assert mine_kl.nats == pytest.approx(their_kl.nats, rel=1e-12)


def test_a_members_checkpoint_continues_alone_as_if_it_never_stopped(mnist_root, float64):
    configs = [c.model_copy(update={"train": c.train.model_copy(update={"checkpoint_every": 1})})
               for c in member_configs(FAMILIES["mlp"], 300, 100, 2, binarize="dynamic")]
    splits = in_float64(load_splits(configs[0].data, mnist_root, CPU))
    states: dict[tuple[int, int], dict] = {}
    stacked = fit_stack(  # a state holds live tensors: copied, as a checkpoint writes them out
        configs, splits, CPU,
        save_state=lambda i, state: states.setdefault((i, state["epoch"]), copy.deepcopy(state)))
    assert sorted(states) == [(i, e) for i in range(len(configs)) for e in (1, 2)]
    for index in (1, 3):
        state = states[(index, 1)]
        continued = fit(configs[index], splits, CPU, resume=state)
        mine = stacked[index].model.state_dict()
        for name, value in continued.model.state_dict().items():
            assert relative_difference(mine[name], value) < 1e-12, name
        assert continued.summary["test_elbo"] == pytest.approx(
            stacked[index].summary["test_elbo"], rel=1e-12)


# conv-bn: a run alone moves by more than 0.05 nats with the thread count (see above)
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"conv-bn"}))
def test_after_two_epochs_each_member_scores_what_its_run_alone_scores(family, mnist_root):
    configs = member_configs(FAMILIES[family], 2000, 100, 2)
    splits = load_splits(configs[0].data, mnist_root, CPU)
    stacked = fit_stack(configs, splits, CPU)
    for config, member in zip(configs, stacked, strict=True):
        alone = fit(config, splits, CPU)
        assert abs(member.summary["test_elbo"] - alone.summary["test_elbo"]) < 0.05
        assert member.summary.keys() == alone.summary.keys()
        if "test_nmi" in alone.summary:  # a cvae's clusters are not scored
            # k-means on latents that differ by float32 rounding: near-ties may flip a point
            assert member.summary["test_nmi"] == pytest.approx(alone.summary["test_nmi"],
                                                               abs=0.05)
        if "conditional_accuracy" in alone.summary:  # the classifier on its digits
            assert member.summary["conditional_accuracy"] == pytest.approx(
                alone.summary["conditional_accuracy"], abs=0.05)
        assert [m.epoch for m in member.history] == [1, 2]


def test_a_diverging_member_fails_and_the_others_finish(mnist_root):
    configs = member_configs(FAMILIES["mlp"], 400, 100, 2)
    configs[1] = configs[1].model_copy(
        update={"optim": configs[1].optim.model_copy(update={"lr": 1e12})}
    )
    splits = load_splits(configs[0].data, mnist_root, CPU)
    outcomes = fit_stack(configs, splits, CPU)
    assert isinstance(outcomes[1], TrainingDiverged)
    assert "nan" in str(outcomes[1]).lower() or "inf" in str(outcomes[1]).lower()
    for index in (0, 2, 3):
        result = outcomes[index]
        assert isinstance(result, TrainResult) and len(result.history) == 2
        assert math.isfinite(result.summary["test_elbo"])
        alone = fit(configs[index], splits, CPU)  # the failed member changed nothing of theirs
        assert result.summary["test_elbo"] == pytest.approx(alone.summary["test_elbo"], abs=0.05)


@pytest.mark.parametrize("family", ["mlp", "conv-bn"])
def test_a_stopped_member_leaves_the_stack_and_the_others_train_on_exactly(
    family, mnist_root, float64
):
    """Member 1 stopped after epoch 1 (as a pruned trial is): the stack goes on without it
    (smaller, its learning-rate runs regrouped: members 0 and 2 and 3 differ in lr), and the
    others' epochs, parameters, running statistics and scores equal their runs alone."""
    configs = member_configs(FAMILIES[family], 200, 100, 3, "mixed", binarize="dynamic")
    splits = in_float64(load_splits(configs[0].data, mnist_root, CPU))
    seen: list[tuple[int, int]] = []
    reason = RuntimeError("pruned after epoch 1")

    def on_epoch(index: int, metrics) -> None:
        seen.append((index, metrics.epoch))
        if index == 1:
            raise MemberStopped(reason)

    stacked = fit_stack(configs, splits, CPU, on_epoch)
    assert stacked[1] is reason
    assert seen == [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (2, 2), (3, 2), (0, 3), (2, 3), (3, 3)]
    for index in (0, 2, 3):
        member, alone = stacked[index], fit(configs[index], splits, CPU)
        assert isinstance(member, TrainResult)
        losses = [m.train_loss for m in alone.history]
        assert [m.train_loss for m in member.history] == pytest.approx(losses, rel=1e-10)
        mine, theirs = member.model.state_dict(), alone.model.state_dict()
        for name in theirs.keys() - rounding_driven_tensors(alone.model):  # (batch norm)
            if theirs[name].dtype.is_floating_point:
                assert relative_difference(mine[name], theirs[name]) < 1e-10, (index, name)
            else:
                assert torch.equal(mine[name], theirs[name]), name  # batches tracked


@pytest.mark.parametrize("name", sorted(STACKED_OPTIMIZERS))
def test_a_stacked_optimizer_is_torchs_per_member(name):
    torch_kind = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}[name]
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    lrs = [1e-3, 1e-2, 3e-4]
    stacked = torch.nn.Parameter(torch.stack([w.detach() for w in weights]))
    optimizer = STACKED_OPTIMIZERS[name]([stacked], lrs)
    singles = [torch_kind([w], lr=lr) for w, lr in zip(weights, lrs, strict=True)]
    for step in range(5):
        grads = torch.randn(3, 5, 3) * (step + 1)
        stacked.grad = grads.clone()
        optimizer.step()
        for w, single, grad in zip(weights, singles, grads, strict=True):
            w.grad = grad.clone()
            single.step()
    for k, (w, single) in enumerate(zip(weights, singles, strict=True)):
        assert torch.allclose(stacked[k], w, rtol=1e-6, atol=1e-7)
        # the member's state is the one its torch optimizer holds, and loads into a fresh one
        fresh = torch_kind([torch.zeros(5, 3, requires_grad=True)], lr=lrs[k])
        state = optimizer.member_state(k, fresh)
        fresh.load_state_dict(state)
        theirs = single.state_dict()["state"][0]
        for key, value in theirs.items():
            assert torch.allclose(state["state"][0][key], value, rtol=1e-6), key


def stacked_members(model: dict) -> tuple[StackedGaussianVAE, list[torch.nn.Module]]:
    from vaebench.models import build_model

    config = RunConfig.model_validate({"model": model})
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(config.model, (1, 28, 28)))
    return StackedGaussianVAE(members), members


def test_a_stacked_model_computes_each_members_forward(conv_layout):
    stack, members = stacked_members(FAMILIES["conv"])
    x, noise = torch.rand(3, 5, 1, 28, 28), torch.randn(3, 5, 4)
    out = stack(x, noise)
    logits, mu = out.logits, out.mu
    for k, member in enumerate(members):
        member_mu, member_logvar = member.encode(x[k])
        z = member_mu + noise[k] * torch.exp(0.5 * member_logvar)
        assert torch.allclose(mu[k], member_mu, atol=1e-5)
        assert torch.allclose(logits[k], member.decode(z), atol=1e-5)
    assert stack.member_state(1).keys() == members[1].state_dict().keys()


def test_a_stacked_conv_gmvae_computes_each_members_forward_and_loss():
    model = {**FAMILIES["conv"], "arch": "gmvae", "categories": 3}
    stack, members = stacked_members(model)
    x = torch.rand(3, 5, 1, 28, 28)
    noise = torch.randn(3, *stack.noise_shape(5))
    out = stack(x, noise)
    weights = torch.softmax(out.category_logits, dim=-1)
    costs = reconstruction(out.logits, x, ["bce", "mse", "bce"], weights)
    kl_z = stack.kl_terms(out)["kl_z"]
    for k, member in enumerate(members):
        posterior = member.posterior(x[k])  # q(c|x) and every component's q(z|x, c)
        mixture = posterior.mixture
        z = mixture.mu + noise[k] * torch.exp(0.5 * mixture.logvar)  # as forward() draws it
        decoded = member.decoder(z.transpose(0, 1).reshape(-1, 4))
        assert torch.allclose(out.logits[k], decoded, atol=1e-5)
        assert torch.allclose(out.mu[k], mixture.mu, atol=1e-5)
        assert torch.allclose(kl_z[k], member.kl_terms(posterior)["kl_z"], rtol=1e-5)
        kind = ["bce", "mse", "bce"][k]
        expected = expected_reconstruction(decoded, x[k], weights[k], kind)
        assert torch.allclose(costs[k], expected, rtol=1e-5)


def test_the_stackable_optimizers_are_the_stacked_ones():
    assert set(STACKED_OPTIMIZER_NAMES) == set(STACKED_OPTIMIZERS)


def test_which_runs_stack():
    base = {"model": FAMILIES["mlp"]}
    config = RunConfig.model_validate(base)
    assert config_problem(config) is None
    reseeded = RunConfig.model_validate({**base, "seed": 5, "loss": {"beta": 3.0, "recon": "mse"},
                                         "optim": {"lr": 0.01}})
    assert stack_key(reseeded) == stack_key(config)
    other_optimizer = RunConfig.model_validate({**base, "optim": {"name": "rmsprop"}})
    assert stack_key(other_optimizer) != stack_key(config)
    assert stack_key(RunConfig.model_validate({**base, "train": {"epochs": 3}})) != stack_key(
        config
    )
    assert config_problem(RunConfig.model_validate({"model": FAMILIES["cvae"]})) is None
    conv_cvae = RunConfig.model_validate({"model": {"arch": "cvae", "backbone": "conv"}})
    assert config_problem(conv_cvae) is None
    assert config_problem(conv_cvae, on_cpu=True) is None
    assert config_problem(RunConfig.model_validate({"model": FAMILIES["gumbel"]})) is None
    assert config_problem(RunConfig.model_validate({"model": FAMILIES["conv-bn"]})) is None
    gmvae = RunConfig.model_validate({"model": FAMILIES["gmvae"]})
    assert config_problem(gmvae) is None
    assert "CUDA only" in config_problem(gmvae, on_cpu=True)
    for stacked in ({"model": {"arch": "gumbel"}, "loss": {"objective": "capacity"}},
                    {**base, "loss": {"objective": "capacity"}}):
        assert config_problem(RunConfig.model_validate(stacked)) is None, stacked
    other_options = {**base, "optim": {"kwargs": {"weight_decay": 0.1}}}
    assert config_problem(RunConfig.model_validate(other_options))
