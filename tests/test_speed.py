"""The CPU-testable parts of the GPU fast path: the bf16 AdamW and its fused-into-backward mode."""

import copy

import torch

from dreampipe import speed


def tiny_net(dtype=torch.bfloat16):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.GELU(), torch.nn.Conv2d(5, 2, 1))
    return net.to(dtype=dtype, memory_format=torch.channels_last)


def train(net, opt, steps, g=None):
    g = g or torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=g).to(next(net.parameters()).dtype)

        def closure():
            loss = net(x).float().square().mean()
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    return [p.detach().float().clone() for p in net.parameters()]


def test_stochastic_rounding_keeps_updates_below_half_an_ulp():
    """lr 1e-4 moves a weight of 1.0 by far less than half a bf16 ulp (2**-8) a step:
    round-to-nearest bf16 AdamW never moves it; AdamWBF16 moves weights within an ulp of
    fp32 AdamW, and on average exactly as far."""
    start = torch.ones(4096)
    grads = torch.randn(100, 4096, generator=torch.Generator().manual_seed(0)) + 0.5
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


def test_fused_backward_gives_the_same_weights_as_the_plain_step():
    a, b = tiny_net(), tiny_net()
    plain = train(a, speed.AdamWBF16(a.parameters(), lr=1e-3), 5)
    fused = train(b, speed.AdamWBF16(b.parameters(), lr=1e-3, fused_backward=True), 5)
    assert all(torch.equal(x, y) for x, y in zip(plain, fused))
    assert all(p.grad is None for p in b.parameters())


def test_resuming_from_state_dict_gives_the_same_weights():
    a, b = tiny_net(), tiny_net()
    opt_a = speed.AdamWBF16(a.parameters(), lr=1e-3)
    whole = train(a, opt_a, 6)
    opt_b = speed.AdamWBF16(b.parameters(), lr=1e-3)
    train(b, opt_b, 3)
    state, weights = copy.deepcopy(opt_b.state_dict()), copy.deepcopy(b.state_dict())
    c = tiny_net()
    c.load_state_dict(weights)
    opt_c = speed.AdamWBF16(c.parameters(), lr=1e-3)
    opt_c.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same inputs the first 3 steps of `whole` drew
        torch.randn(4, 3, 6, 6, generator=g)
    resumed = train(c, opt_c, 3, g)
    assert all(torch.equal(x, y) for x, y in zip(whole, resumed))


def test_cpu_runs_are_unchanged(tiny_model):
    from dreampipe import checkpoint

    model = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
    settings = {"precision": "auto", "compile": "auto", "low_memory": True, "adam_weight_decay": 0.01,
                "seed": 0, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0}
    speed.prepare_training(model, settings, "cpu")
    opt = speed.optimizer([{"params": list(model.unet.parameters()), "lr": 1e-4}], settings, "cpu")
    assert type(opt) is torch.optim.AdamW
    assert model.unet._compiled_call_impl is None
    assert not model.unet.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.unet.parameters())
