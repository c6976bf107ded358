"""The CPU-testable parts of the GPU fast path: the bf16 AdamW and its fused-into-backward mode.
Tests taking `device` run here on the CPU and again on CUDA from tests/test_gpu.py."""

import copy
import gc
import inspect
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from dreampipe import checkpoint, config, speed


def tiny_net(dtype=torch.bfloat16, device="cpu"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.GELU(), torch.nn.Conv2d(5, 2, 1))
    return net.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def train(net, opt, steps, g=None):
    g = g or torch.Generator().manual_seed(1)
    for _ in range(steps):
        weight = next(net.parameters())
        x = torch.randn(4, 3, 6, 6, generator=g).to(weight.device, weight.dtype)

        def closure():
            loss = net(x).float().square().mean()
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    return [p.detach().float().cpu() for p in net.parameters()]


def test_stochastic_rounding_keeps_updates_below_half_an_ulp(device="cpu"):
    """lr 1e-4 moves a weight of 1.0 by far less than half a bf16 ulp (2**-8) a step:
    round-to-nearest bf16 AdamW never moves it; AdamWBF16 moves weights within an ulp of
    fp32 AdamW, and on average exactly as far."""
    start = torch.ones(4096, device=device)
    grads = (torch.randn(100, 4096, generator=torch.Generator().manual_seed(0)) + 0.5).to(device)
    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("sr", torch.bfloat16)):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = (speed.AdamWBF16 if name == "sr" else torch.optim.AdamW)([p], lr=1e-4, weight_decay=0.0)
        for g in grads:
            if name == "sr":
                p.grad.copy_(g)  # AdamWBF16 keeps gradients in its flat buffer
            else:
                p.grad = g.to(dtype)
            opt.step()
        results[name] = p.detach().float()
    drift = (results["fp32"] - start).mean().abs()
    assert drift > 0.004
    assert torch.equal(results["bf16"], start)
    assert (results["sr"] - results["fp32"]).abs().mean() < 2**-7
    assert (results["sr"].mean() - results["fp32"].mean()).abs() < 0.1 * drift  # RTN: off by all of it


def test_fused_backward_gives_the_same_weights_as_the_plain_step(device="cpu"):
    a, b = tiny_net(device=device), tiny_net(device=device)
    plain = train(a, speed.AdamWBF16(a.parameters(), lr=1e-3), 5)
    fused = train(b, speed.AdamWBF16(b.parameters(), lr=1e-3, fused_backward=True), 5)
    assert all(torch.equal(x, y) for x, y in zip(plain, fused))
    assert all(p.grad is None for p in b.parameters())


def test_resuming_from_state_dict_gives_the_same_weights(device="cpu"):
    a, b = tiny_net(device=device), tiny_net(device=device)
    opt_a = speed.AdamWBF16(a.parameters(), lr=1e-3)
    whole = train(a, opt_a, 6)
    opt_b = speed.AdamWBF16(b.parameters(), lr=1e-3)
    train(b, opt_b, 3)
    state, weights = copy.deepcopy(opt_b.state_dict()), copy.deepcopy(b.state_dict())
    c = tiny_net(device=device)
    c.load_state_dict(weights)
    opt_c = speed.AdamWBF16(c.parameters(), lr=1e-3)
    opt_c.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same inputs the first 3 steps of `whole` drew
        torch.randn(4, 3, 6, 6, generator=g)
    resumed = train(c, opt_c, 3, g)
    assert all(torch.equal(x, y) for x, y in zip(whole, resumed))


def test_cpu_runs_are_unchanged(tiny_model):
    model = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
    settings = {"precision": "auto", "compile": "auto", "low_memory": True, "adam_weight_decay": 0.01,
                "seed": 0, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0}
    speed.prepare_training(model, settings, "cpu")
    opt = speed.optimizer([{"params": list(model.unet.parameters()), "lr": 1e-4}], settings, "cpu")
    assert type(opt) is torch.optim.AdamW
    assert model.unet._compiled_call_impl is None
    assert not model.unet.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.unet.parameters())


def test_only_adamw_gets_bf16_weights_on_a_gpu():
    """bitsandbytes' 8-bit AdamW rounds bf16 weights to nearest (updates below half an ulp are
    lost), so it keeps fp32 master weights; AdamWBF16 rounds stochastically."""
    settings = {"precision": "auto", "optimizer": "adamw"}
    assert speed.bf16_weights(settings, "cuda")
    assert not speed.bf16_weights({**settings, "optimizer": "adamw8bit"}, "cuda")
    assert not speed.bf16_weights({**settings, "precision": "32-true"}, "cuda")
    assert not speed.bf16_weights(settings, "cpu")


def test_the_low_memory_profile_replays_cuda_graphs_once_flat_gradients_are_on(monkeypatch):
    """Its step is CPU-bound eagerly (318 ms for 48 ms of GPU work at SD size): with
    FlatGradients the graph holds the per-weight updates (22 it/s on an H200);
    DREAMPIPE_FLAT_GRADIENTS=0 turns FlatGradients off."""
    low = {**config.defaults()["train"], "low_memory": True}
    monkeypatch.delenv("DREAMPIPE_FLAT_GRADIENTS", raising=False)
    assert speed.compile_scope(low) == "graphs"
    monkeypatch.setenv("DREAMPIPE_FLAT_GRADIENTS", "0")
    assert speed.compile_scope(low) is None
    monkeypatch.delenv("DREAMPIPE_FLAT_GRADIENTS")
    assert speed.compile_scope({**low, "compile": False}) is None


def test_an_optimizer_no_longer_referenced_stops_updating_the_weights_from_its_hooks():
    """fused_backward steps each weight in a hook on it: the hooks of an optimizer that was
    dropped (a second fit of the same networks in one process, a notebook) must not step them
    any more, or they move twice, once with a stale state."""
    net, ref = tiny_net(), tiny_net()
    old = speed.AdamWBF16([{"params": list(net.parameters()), "lr": 1e-2}], fused_backward=True)
    del old
    gc.collect()
    train(net, speed.AdamWBF16([{"params": list(net.parameters()), "lr": 1e-2}], fused_backward=True), 3)
    train(ref, speed.AdamWBF16([{"params": list(ref.parameters()), "lr": 1e-2}], fused_backward=True), 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def test_a_dry_run_drops_the_gradients_of_weights_stepped_in_the_backward_without_a_step():
    """A CUDA graph's warm-up runs the backward for nothing: the low-memory hooks must drop each
    gradient (the memory peak stays that of the profile) and leave the weight as it is."""
    net = tiny_net()
    opt = speed.AdamWBF16([{"params": list(net.parameters()), "lr": 1e-2}], fused_backward=True)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(2, 3, 6, 6).to(torch.bfloat16)

    def closure():
        net(x).float().square().mean().backward()

    with speed.dry_run():
        opt.step(closure)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    opt.step(closure)
    assert not any(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_checkpointing_keeps_no_rng_state_which_a_cuda_graph_capture_cannot_read(tiny_model, monkeypatch):
    """Gradient checkpointing recomputes each block in the backward. torch saves and restores the
    RNG state around it for dropout, and before torch 2.10 reading the CUDA RNG state inside a
    graph capture fails (pytorch issue 162504): SD's UNet has no dropout, so it keeps none. The
    gradients are those without checkpointing."""
    import torch.utils.checkpoint

    unet = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1]).unet
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    plain = torch.autograd.grad(unet(x, t, encoder_hidden_states=c).sample.sum(), list(unet.parameters()))
    calls, original = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: (calls.append(k), original(*a, **k))[1])
    speed.checkpointing(unet)
    checkpointed = torch.autograd.grad(unet(x, t, encoder_hidden_states=c).sample.sum(), list(unet.parameters()))
    assert calls and all(k == {"use_reentrant": False, "preserve_rng_state": False} for k in calls)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


def test_no_cuda_graphs_where_their_gradients_would_add_to_themselves():
    """torch's make_graphed_callables hands back its static gradient buffers; where a weight's
    .grad is None, autograd takes that buffer over as the .grad, and the next micro-batch's replay
    overwrites it and then adds it to itself (pytorch issue 181723): with fp32 weights (adamw8bit,
    fp32 precision) and gradient accumulation the UNet runs without graphs. AdamWBF16's gradients
    are views of its own buffer, so the default profile keeps them."""
    defaults = {**config.defaults()["train"], "gradient_accumulation_steps": 2}
    assert speed.compile_scope(defaults) == "graphs"
    assert speed.compile_scope({**defaults, "optimizer": "adamw8bit"}) is None
    assert speed.compile_scope({**defaults, "precision": "32-true", "compile": "graphs"}) is None
    assert speed.compile_scope({**defaults, "optimizer": "adamw8bit", "gradient_accumulation_steps": 1}) == "graphs"


def test_auto_replays_cuda_graphs_on_one_gpu_or_several_and_runs_eagerly_with_checkpointing_alone():
    """Graphs under DDP too (the gradients are averaged after the replayed backward):
    blocks, auto's former choice under DDP, ran 9.8 it/s on one H200 against 22 for graphs.
    Gradient checkpointing alone is a memory setting: eager."""
    defaults = config.defaults()["train"]
    assert speed.compile_scope(defaults) == "graphs"
    assert speed.compile_scope({**defaults, "devices": 2}) == "graphs"
    assert speed.compile_scope({**defaults, "gradient_checkpointing": True}) is None
    assert speed.compile_scope({**defaults, "compile": "blocks"}) == "blocks"
    assert "world_size" not in inspect.signature(speed.prepare_training).parameters


@pytest.mark.parametrize("fused_backward", [False, True])
def test_a_frozen_parameter_is_not_updated_as_in_torch_adamw(fused_backward, device="cpu"):
    """After its network stops training (requires_grad False), a weight keeps its value: no
    momentum tail, no weight decay. torch's AdamW on fp32 copies does the same."""
    net = tiny_net(device=device)
    ref = copy.deepcopy(net).float()
    opt = speed.AdamWBF16(net.parameters(), lr=1e-2, weight_decay=0.1, fused_backward=fused_backward)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    train(net, opt, 3)
    train(ref, ref_opt, 3)
    before = [p.detach().clone() for p in net.parameters()]
    ref_before = [p.detach().clone() for p in ref.parameters()]
    net[2].requires_grad_(False)
    ref[2].requires_grad_(False)
    after = train(net, opt, 3)
    ref_after = train(ref, ref_opt, 3)
    for weights, start in ((after, before), (ref_after, ref_before)):
        assert not torch.equal(weights[0], start[0].float().cpu())  # the first layer trains on
        assert all(torch.equal(a, b.float().cpu()) for a, b in zip(weights[2:], start[2:]))


def micro_batches(opt, p, contributions):
    """One accumulation window of len(contributions) micro-batches, as Lightning runs it, in which
    micro-batch k's gradient of p is contributions[k]; p.grad at the end (what the step uses)."""
    opt.zero_grad()
    for c in contributions:
        opt.before_backward()
        (p.float() * c).sum().backward()
        opt.after_backward()
    return p.grad.float()


def test_accumulated_gradients_are_summed_in_fp32(device="cpu"):
    """One large gradient then seven each below half a bf16 ulp of the sum: summed in bf16 they
    vanish; summed in fp32 they move the gradient the step sees by two ulps."""
    p = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16, device=device))
    opt = speed.AdamWBF16([p], lr=1e-3, accumulation_steps=8)
    contributions = [1.0] + [2**-9] * 7
    exact = torch.tensor(sum(contributions), device=device).bfloat16().float()
    assert exact > 1.0
    assert torch.all(micro_batches(opt, p, contributions) == exact)
    assert torch.all(micro_batches(opt, p, [0.5] * 8) == 4.0)  # a new window starts from zero


def test_any_seed_of_the_schema_works_as_its_int32_value(device="cpu"):
    """Seeds go up to 2**32 - 1; the random bits are int32 arithmetic, so such a seed acts as its
    int32 value (2**32 - 1 as -1)."""
    results = []
    for seed in (2**32 - 1, -1):
        net = tiny_net(device=device)
        results.append(train(net, speed.AdamWBF16(net.parameters(), lr=1e-2, seed=seed), 3))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def check_kernel_against_torch(device: str) -> None:
    """adamw_kernel.adamw_sr_ against speed.adamw_sr_ on a slice that does not fill the kernel's
    last block, with a large offset and weight decay. Same formula, same random bits: the bf16
    results agree but where the fp32 values (bias corrections by exp2 against pow) differ in
    their last bits across a rounding boundary, which moves a value by one ulp."""
    from dreampipe import adamw_kernel

    g = torch.Generator().manual_seed(0)
    n = 3 * adamw_kernel.BLOCK + 48
    p, m = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-3
    v, grad = torch.rand(n, generator=g) * 1e-6, torch.randn(n, generator=g) * 1e-3
    p, m, v, grad = (t.to(device, torch.bfloat16) for t in (p, m, v, grad))
    args = (torch.tensor(3e-2, device=device), torch.tensor(7.0, device=device), -5,  # seeds are int32
            torch.tensor(2**30, dtype=torch.int32, device=device), 0.9, 0.999, 1e-8, 1e-2)
    ours = [t.clone() for t in (p, grad, m, v)]
    adamw_kernel.adamw_sr_(*ours, *args)
    assert (ours[0] != p).float().mean() > 0.5  # the step moved most weights
    speed.adamw_sr_(p, grad, m, v, *args)
    assert torch.equal(ours[1], grad)
    for a, b in ((ours[0], p), (ours[2], m), (ours[3], v)):
        assert ((a.float() - b.float()).abs() <= b.float().abs() * 2**-7).all()
        # the first moment is rounded to nearest, which Triton's CPU interpreter does not do exactly
        assert b is m and device == "cpu" or (a != b).float().mean() < 0.01


def test_triton_kernel_makes_the_torch_update(device="cpu"):
    """The GPU's AdamW kernel, here in Triton's CPU interpreter (set before triton is imported)."""
    if device != "cpu":
        return check_kernel_against_torch(device)
    code = "import test_speed; test_speed.check_kernel_against_torch('cpu')"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _flat_ddp_rank(rank: int, port: int, out: str, low_memory: bool) -> None:
    """One of two gloo ranks, as train.FlatGradientDDP runs them: no DDP wrapper, the bf16 net's
    optimizer averages the flat gradients after the backward (the training module's
    on_after_backward calls after_backward) and steps; this rank's gradient before and after, and
    its weights after the step, saved to out/rank.pt."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    speed.bf16_weights = lambda settings, device: True  # the GPU's optimizer, on the CPU
    net = tiny_net()
    settings = {**config.defaults()["train"], "low_memory": low_memory, "max_grad_norm": 0}
    opt = speed.optimizer([{"params": list(net.parameters()), "lr": 1e-2}], settings, "cpu", world_size=2)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    ref = tiny_net()  # this rank's own gradient
    grads, reduced = {"own": list(torch.autograd.grad(ref(x).float().square().mean(), list(ref.parameters())))}, []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (reduced.append(t.numel()), all_reduce(t, *a, **k))[1]

    def closure():
        opt.before_backward()
        net(x).float().square().mean().backward()
        grads["during_backward"] = len(reduced)
        opt.after_backward()
        grads["averaged"] = [p.grad.clone() for p in net.parameters()]

    opt.zero_grad()
    opt.step(closure)
    torch.save({**grads, "weights": [p.detach().clone() for p in net.parameters()], "fused": opt.fused_backward},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


class _RankModule(pl.LightningModule):
    """A bf16 net trained as DreamBooth trains (AdamWBF16, its accumulation hooks), each rank on
    its own data; its weights, and the gradient norms the optimizer saw, saved at the end."""

    def __init__(self, out: str):
        super().__init__()
        self.out, self.net, self.norms = out, tiny_net(), []

    def setup(self, stage):
        if self.global_rank == 1:  # a rank that loaded other weights: the strategy starts it from rank 0's
            with torch.no_grad():
                next(self.net.parameters()).add_(1)

    def training_step(self, batch, i):
        g = torch.Generator().manual_seed(1000 * self.global_rank + i)
        return self.net(torch.randn(2, 3, 6, 6, generator=g).to(torch.bfloat16)).float().square().mean()

    def configure_optimizers(self):
        return speed.AdamWBF16([{"params": list(self.net.parameters()), "lr": 1e-2}], accumulation_steps=2,
                               world_size=self.trainer.world_size)

    def on_before_backward(self, loss):
        self.trainer.optimizers[0].before_backward()

    def on_after_backward(self):
        self.trainer.optimizers[0].after_backward()

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(float(torch.cat([p.grad.float().flatten() for p in self.net.parameters()]).norm()))

    def on_train_end(self):
        torch.save({"weights": [p.detach().clone() for p in self.net.parameters()], "norms": self.norms},
                   f"{self.out}/{self.global_rank}.pt")


def test_flat_gradient_ddp_trains_two_ranks_alike_through_lightning(tmp_path):
    """train.FlatGradientDDP (DDP without torch's wrapper: AdamWBF16 averages its flat gradients)
    through Lightning, two gloo ranks on their own data, 2 micro-batches accumulated, gradients
    clipped: every rank starts from rank 0's weights, sees the same (averaged) gradient and ends
    with the same weights."""
    from dreampipe import train

    strategy = train.FlatGradientDDP(start_method="spawn", process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, accumulate_grad_batches=2,
                         gradient_clip_val=0.05, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(_RankModule(str(tmp_path)), torch.utils.data.DataLoader(range(6), batch_size=None))
    first, second = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1))
    assert len(first["norms"]) == 3 and first["norms"] == second["norms"]
    assert not any(torch.equal(a, b) for a, b in zip(first["weights"], tiny_net().parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], second["weights"]))


@pytest.mark.parametrize("low_memory", [False, True])
def test_two_ranks_step_with_their_averaged_flat_gradients_and_stay_equal(low_memory, tmp_path):
    """Under DDP with bf16 weights (train.FlatGradientDDP) AdamWBF16 averages its flat gradient
    buffers over the ranks itself, one all-reduce a group, in place of DDP's reducer, so every
    rank steps with the mean gradient and their weights stay equal. The low-memory profile too:
    its step inside the backward would come before the averaging, so under DDP it steps after."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_flat_ddp_rank, args=(port, str(tmp_path), low_memory), nprocs=2, start_method="spawn")
    first, second = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1))
    assert not first["fused"], "under DDP even the low-memory profile steps after the averaging"
    assert first["during_backward"] > 0, "the averaging of the first gradients complete starts inside the backward"
    for a, b, mean0, mean1 in zip(first["own"], second["own"], first["averaged"], second["averaged"]):
        assert not torch.equal(a, b)
        torch.testing.assert_close(mean0, ((a.float() + b.float()) / 2).to(torch.bfloat16), rtol=2**-8, atol=0)
        assert torch.equal(mean0, mean1)
    assert not any(torch.equal(a, b) for a, b in zip(first["weights"], tiny_net().parameters())), "the step moved every weight"
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], second["weights"]))


@pytest.mark.parametrize("text_grad", [False, True])
@pytest.mark.parametrize("low_memory", [False, True])
def test_flat_gradients_train_as_autograd_without_touching_the_weights(tiny_model, text_grad, low_memory):
    """GraphedUNet's backward adds the weights' gradients into AdamWBF16's flat buffer itself
    (speed.FlatGradients, here eagerly: the CPU has no CUDA graphs), so autograd runs nothing for
    the UNet's weights (AccumulateGrad cost about 10 ms of CPU a step at SD size); in the
    low-memory profile (checkpointing, each weight updated inside the backward) the backward holds
    those updates. The weights end bit for bit where plain autograd puts them, and a text context
    that needs a gradient gets it."""
    runs = {}
    for name in ("autograd", "flat"):
        unet = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1]).unet.to(torch.bfloat16)
        if low_memory:
            speed.checkpointing(unet)
        opt = speed.AdamWBF16([{"params": list(unet.parameters()), "lr": 1e-3}], seed=0, fused_backward=low_memory)
        accumulated = []
        for p in unet.parameters():
            p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
        call = (speed.GraphedUNet(unet, flat=True, capture=False) if name == "flat"
                else lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample)
        g = torch.Generator().manual_seed(0)
        context_grads = []
        for _ in range(3):
            x = torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16)
            context = torch.randn(2, 77, 32, generator=g).to(torch.bfloat16).requires_grad_(text_grad)
            t = torch.randint(0, 1000, (2,), generator=g)

            def closure():
                opt.zero_grad()
                torch.nn.functional.mse_loss(call(x, t, context).float(), torch.zeros(2, 4, 8, 8)).backward()

            opt.step(closure)
            context_grads.append(context.grad)
        runs[name] = ([p.detach().clone() for p in unet.parameters()], accumulated, context_grads)
    (plain, plain_acc, plain_ctx), (flat, flat_acc, flat_ctx) = runs["autograd"], runs["flat"]
    assert [type(g) for g in call.graphs.values()] == [speed.FlatGradients]
    assert plain_acc and bool(flat_acc) == low_memory, "autograd accumulates no weight's gradient (but for the hooks)"
    assert all(torch.equal(a, b) for a, b in zip(plain, flat))
    assert not any(torch.equal(a, b) for a, b in zip(plain, checkpoint.load(tiny_model[0]).unet.to(torch.bfloat16).parameters()))
    for a, b in zip(plain_ctx, flat_ctx):
        assert (a is None and b is None) if not text_grad else torch.equal(a, b)


def test_eager_sampling_is_nchw_and_compiled_sampling_channels_last():
    """CUDA's GroupNorm takes contiguous NCHW only: on a channels-last UNet every GroupNorm copies
    to NCHW and back, 29 % of eager sampling's GPU time on an H200 (docs/benchmarks.md); inductor
    fuses the norms, and compiled blocks keep channels-last."""
    import torch

    assert speed.sampling_memory_format(None) == torch.contiguous_format
    assert speed.sampling_memory_format("blocks") == torch.channels_last
    assert speed.sampling_memory_format("unet") == torch.channels_last
