"""The GPU fast path of training and sampling. On the CPU nothing here changes anything.

Training on a GPU (precision auto or bf16-mixed, optimizer adamw): the trained networks hold bf16
weights and AdamWBF16 keeps them faithful (fp32 arithmetic, stochastic rounding, so that updates
far below a bf16 ulp still add up); frozen networks keep the dtype they were loaded in, so they are
written out exactly as loaded. The UNet is channels-last, and its forward and backward are
replayed as CUDA graphs (no compile: the eager step is launch-bound). The low-memory profile adds
gradient checkpointing and runs each weight's optimizer step inside the backward pass, so
gradients are never all held at once.
Sampling on a GPU: bf16, NCHW; the UNet compiled block by block (channels-last) for long jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger("dreampipe.speed")


def on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def bf16_weights(settings: dict, device) -> bool:
    """bf16 weights only for the optimizer that rounds them stochastically (AdamWBF16): any other
    (bitsandbytes' 8-bit AdamW) rounds to nearest, which drops every update below half a bf16 ulp,
    so it updates fp32 master weights while autocast computes in bf16."""
    return on_gpu(device) and settings["precision"] in ("auto", "bf16-mixed") and settings["optimizer"] == "adamw"


# Regional compilation: these blocks make up nearly all of the UNet's work and repeat with a few
# distinct shapes, so compiling each block alone costs a fraction of compiling the whole UNet.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_scope(settings: dict) -> str | None:
    """`train.compile`: graphs = the UNet's forward and backward replayed as CUDA graphs, nothing
    compiled; blocks = each repeated block compiled alone; unet = the whole UNet compiled, with CUDA
    graphs; false = eager. auto = graphs, on one GPU or under DDP (train.FlatGradientDDP averages
    the gradients after the replayed backward) and in the low-memory profile (the graph holds its
    per-weight optimizer steps: FlatGradients), eager there with DREAMPIPE_FLAT_GRADIENTS=0; eager
    with gradient checkpointing alone (which recomputes activations in the backward: a memory
    setting, not a speed one)."""
    scope = settings.get("compile", "auto")
    if scope == "auto":
        if settings.get("low_memory"):
            scope = "graphs" if flat_gradients() else None
        else:
            scope = None if settings.get("gradient_checkpointing") else "graphs"
    if scope == "graphs" and settings.get("gradient_accumulation_steps", 1) > 1 and not bf16_weights(settings, "cuda"):
        # torch's graphed backward hands back its static buffers: a .grad that is one of them is
        # overwritten by the next micro-batch's replay, then added to itself (pytorch issue 181723);
        # AdamWBF16's gradients (bf16 weights) are views of its own buffer
        return None
    return scope or None


def flat_gradients() -> bool:
    """GraphedUNet with FlatGradients, in the default profile and the low-memory one (measured
    on an H200, docs/benchmarks.md); DREAMPIPE_FLAT_GRADIENTS=0 turns it off, as a way around
    should a GPU or torch version fail with it."""
    return os.environ.get("DREAMPIPE_FLAT_GRADIENTS") != "0"


def compile_unet(unet: torch.nn.Module, scope: str) -> None:
    """Compile the UNet in place (state_dict keys unchanged): whole (CUDA graphs) or block by block."""
    if scope == "unet":
        compile_module(unet, "reduce-overhead")
        return
    # one graph per distinct block shape, each specialised (no dynamic-shape kernels)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False
    for block in unet.modules():
        if type(block).__name__ in REPEATED_BLOCKS:
            compile_module(block, None)


def compile_module(module: torch.nn.Module, mode: str | None) -> None:
    """Compile in place (state_dict keys unchanged), eager if the compiler fails."""
    module._compiled_call_impl = compiled_or_eager(module._call_impl, mode=mode)


def compiled_or_eager(fn, **options):
    """torch.compile(fn), falling back to fn with a warning if the compiler fails on a call."""
    compiled = torch.compile(fn, **options)
    name = type(fn.__self__).__name__ if hasattr(fn, "__self__") else fn.__name__

    def call(*args, **kwargs):
        nonlocal compiled
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            warnings.warn(f"torch.compile of {name} failed, running it eagerly: {str(e).splitlines()[0]}")
            compiled = fn
            return fn(*args, **kwargs)

    return call


def eager():
    """Run compiled modules eagerly inside this context (e.g. sample grids during training,
    whose shapes would otherwise compile a second graph)."""
    return torch.compiler.set_stance("force_eager")


# weight -> the view of AdamWBF16's flat gradient buffer that stays its .grad (zero_grad included)
FLAT_GRADS = WeakIdKeyDictionary()
# weights AdamWBF16 updates inside the backward, in a hook on each (fused_backward)
STEPPED_IN_BACKWARD = WeakIdKeyDictionary()
_DRY_RUN = [False]


@contextlib.contextmanager
def dry_run():
    """The hooks of STEPPED_IN_BACKWARD drop each gradient without updating its weight (a CUDA
    graph's warm-up)."""
    _DRY_RUN[0] = True
    try:
        yield
    finally:
        _DRY_RUN[0] = False


class GraphedUNet:
    """The UNet's training forward and backward replayed as CUDA graphs: the eager step is
    launch-bound (thousands of small kernels), and this removes the launches without compiling
    anything. A graph has fixed shapes: one is captured per input signature (e.g. the text context
    needs a gradient until text_encoder_steps, then not). It runs in the UNet's bf16 without
    autocast; fp32 weights keep the step's autocast, without its cache, which graphs cannot hold.

    With flat, where every trained weight's .grad is a view into AdamWBF16's flat buffer for good
    (FLAT_GRADS; bf16 weights, the default), the backward graph adds the weights' gradients into
    those views itself and autograd never sees the weights (FlatGradients), which would save the
    AccumulateGrad of each of the UNet's 686 weights: about 10 ms of CPU in a 45 ms step
    (torch.profiler, docs/benchmarks.md); where AdamWBF16 updates each weight inside the backward
    (STEPPED_IN_BACKWARD: the low-memory profile) the graph holds those updates, whose Python
    (eager UNet twice under checkpointing, 686 hooks) made that profile's step CPU-bound: 318 ms
    for 48 ms of GPU work (22 it/s with the graph, 3.8 without, on an H200). Otherwise torch's
    make_graphed_callables. capture=False runs FlatGradients eagerly (the CPU tests)."""

    def __init__(self, unet: torch.nn.Module, flat: bool = False, capture: bool = True):
        self.unet, self.graphs, self.flat, self.capture = unet, {}, flat, capture

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.unet(sample, timesteps, encoder_hidden_states=context).sample
        dtype = next(self.unet.parameters()).dtype
        args = (sample.to(dtype), timesteps, context.to(dtype))
        key = tuple((a.shape, a.dtype, a.requires_grad) for a in args)
        mixed = dtype == torch.float32 and torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=mixed, cache_enabled=False):
            if key not in self.graphs:
                if self.flat:  # a signature does not come back (the text encoder stops once): its memory goes
                    self.graphs.clear()
                self.graphs[key] = self._graph(args)
            return self.graphs[key](*args)

    def _graph(self, args):
        call = _UNetCall(self.unet)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        grads = [FLAT_GRADS.get(p) for p in params]
        if self.flat and all(g is not None for g in grads):
            return FlatGradients(call, params, grads, capture=self.capture)
        if self.flat and all(p in STEPPED_IN_BACKWARD for p in params):
            return FlatGradients(call, params, None, capture=self.capture)
        statics = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        return torch.cuda.make_graphed_callables(call, statics, allow_unused_input=True)


class GraphedForward:
    """A UNet forward without gradients replayed as a CUDA graph, one per input signature, each
    call inside `around()` (e.g. a LoRA's adapters switched off): prior_prediction's target every
    step, which eager is launch-bound as the training step is (GraphedUNet). capture=False runs
    it eagerly (the CPU, and compile scopes other than graphs)."""

    def __init__(self, unet: torch.nn.Module, around=contextlib.nullcontext, capture: bool = True):
        self.unet, self.around, self.capture, self.graphs = unet, around, capture, {}

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not self.capture:
            with self.around():
                return self.unet(sample, timesteps, encoder_hidden_states=context).sample
        args = (sample, timesteps, context)
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._graph([a.clone() for a in args])
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _graph(self, static: list[torch.Tensor]):
        def forward():
            with self.around():
                return self.unet(static[0], static[1], encoder_hidden_states=static[2]).sample

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up, as make_graphed_callables does
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward()
        return graph, static, out


class _UNetCall(torch.nn.Module):
    """The UNet as a function of tensors only, as make_graphed_callables needs."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timesteps, context):
        return self.unet(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class FlatGradients:
    """fn(*inputs) whose backward hands the weights' gradients (`params`) not to autograd but
    adds them into `grads` (one foreach add), or, with grads None, accumulates them as autograd
    does, where the optimizer's hooks (fused_backward: the low-memory profile) update each weight
    and drop its gradient. Inputs that require a gradient get theirs through autograd as usual.
    With capture, the forward and the backward, updates included, are CUDA graphs replayed on
    static copies of the inputs (as torch.cuda.make_graphed_callables: warm-up on a side stream,
    one memory pool), so no Python runs for the UNet's modules, weights or hooks; without, they run
    eagerly. With the hooks the first call runs eagerly: its updates are real, and they compile the
    optimizer's kernels before a capture, which must not."""

    def __init__(self, fn, params: list, grads: list | None, capture: bool = True):
        self.fn, self.params, self.grads, self.capture = fn, params, grads, capture
        self.anchor = torch.zeros((), requires_grad=True)  # so the output needs a gradient without the weights
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.capture and self.calls == 1:
            if self.grads is None:
                return self.fn(*args)
            self._capture(args)
        elif self.capture and self.calls == 2 and self.grads is None:
            self._capture(args)
        return _FlatGradientsCall.apply(self, self.anchor, *args)

    def _capture(self, args):
        self.inputs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()), dry_run():
            for _ in range(3 if self.grads is not None else 1):
                out = self.fn(*self.inputs)
                needs = [i for i in self.inputs if i.requires_grad]
                if self.grads is None:  # hooks drop each gradient: the low-memory peak
                    torch.autograd.backward(out, torch.zeros_like(out), inputs=needs + self.params)
                else:
                    torch.autograd.grad(out, needs + self.params, torch.zeros_like(out), allow_unused=True)
                for i in needs:
                    i.grad = None
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool):
            self.out = self.fn(*self.inputs)
        self.grad_out = torch.empty_like(self.out)
        with torch.cuda.graph(self.bwd, pool=pool):
            self.input_grads = self._backward(self.grad_out)

    def forward(self, *args):
        if self.capture:
            for static, a in zip(self.inputs, args):
                if static.data_ptr() != a.data_ptr():
                    static.copy_(a)
            self.fwd.replay()
            return self.out.detach()
        self.inputs = [a.detach().requires_grad_(a.requires_grad) for a in args]
        with torch.enable_grad():
            self.out = self.fn(*self.inputs)
        return self.out.detach()

    def backward(self, grad_out):
        if self.capture:
            self.grad_out.copy_(grad_out)
            self.bwd.replay()
            return tuple(g.detach() if g is not None else None for g in self.input_grads)
        grads = self._backward(grad_out)
        self.inputs = self.out = None
        return grads

    def _backward(self, grad_out):
        needs = [i for i in self.inputs if i.requires_grad]
        if self.grads is None:
            torch.autograd.backward(self.out, grad_out, inputs=needs + self.params)
            given = iter([i.grad for i in needs])
        else:
            grads = torch.autograd.grad(self.out, needs + self.params, grad_out, allow_unused=True)
            pairs = [(acc, g) for acc, g in zip(self.grads, grads[len(needs):]) if g is not None]
            torch._foreach_add_([acc for acc, _ in pairs], [g for _, g in pairs])
            given = iter(grads[:len(needs)])
        return tuple(next(given) if i.requires_grad else None for i in self.inputs)


class _FlatGradientsCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, anchor, *args):
        ctx.runner = runner
        return runner.forward(*args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return (None, None, *ctx.runner.backward(grad_out))


def checkpointing(unet: torch.nn.Module) -> None:
    """Gradient checkpointing of the UNet's blocks, keeping no RNG state: SD's UNet has no dropout,
    and before torch 2.10 reading the CUDA RNG state inside a graph capture fails (pytorch issue
    162504), which the low-memory profile's CUDA graphs would."""
    import torch.utils.checkpoint

    def checkpoint(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)

    unet.enable_gradient_checkpointing(checkpoint)


def prepare_training(model, settings: dict, device):
    """Ready a StableDiffusion model for training on `device` (where it is already, or, under DDP,
    where the strategy moves it next); returns the UNet call of the training step:
    f(noisy latents, timesteps, text context) -> predicted noise."""
    def plain(sample, timesteps, context):
        return model.unet(sample, timesteps, encoder_hidden_states=context).sample

    if not on_gpu(device):
        return plain
    if bf16_weights(settings, device):
        model.unet.to(dtype=torch.bfloat16)
        if settings["train_text_encoder"]:
            model.text_encoder.to(dtype=torch.bfloat16)
    model.unet.to(memory_format=torch.channels_last)
    if settings.get("low_memory"):
        checkpointing(model.unet)
    scope = compile_scope(settings)
    if scope == "graphs":
        return GraphedUNet(model.unet, flat=flat_gradients())
    if scope:
        compile_unet(model.unet, scope)
    return plain


def sampling_memory_format(scope: str | None) -> torch.memory_format:
    """NCHW for eager sampling: CUDA's GroupNorm takes contiguous NCHW only, so on channels-last
    networks each GroupNorm copies to NCHW and back (on an H200 eager class images ran at 6.2
    images/s in NCHW, 5.2 channels-last; docs/benchmarks.md). Compiled blocks fuse the norms and
    run channels-last (7.1). Training keeps channels-last: its step is faster so (24.1 steps/s, 21.1)."""
    return torch.channels_last if scope else torch.contiguous_format


def prepare_sampling(model, device, scope: str | None = "blocks") -> None:
    """Ready a StableDiffusion model, already on `device` in its sampling dtype, for sampling;
    scope blocks or unet as in compile_unet, None = eager."""
    if not on_gpu(device):
        return
    model.unet.to(memory_format=sampling_memory_format(scope))
    model.vae.to(memory_format=sampling_memory_format(scope))
    if scope:
        compile_unet(model.unet, scope)


def optimizer(groups: list[dict], settings: dict, device, *, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW for the trained parameter groups: AdamWBF16 for bf16 weights, else torch's (fused on GPU).
    The low-memory profile steps each weight inside the backward on one process only: under DDP
    (world_size > 1) that step would come before DDP averages the weight's gradient."""
    if not bf16_weights(settings, device):
        return torch.optim.AdamW(groups, weight_decay=settings["adam_weight_decay"], fused=on_gpu(device))
    fused_backward = (bool(settings.get("low_memory")) and settings["gradient_accumulation_steps"] == 1
                      and world_size == 1)
    if fused_backward and settings["max_grad_norm"]:
        log.warning("low_memory: gradients are applied one weight at a time, so max_grad_norm "
                    "(a norm over all of them) is not applied")
    return AdamWBF16(groups, weight_decay=settings["adam_weight_decay"], seed=settings["seed"],
                     fused_backward=fused_backward, accumulation_steps=settings["gradient_accumulation_steps"],
                     world_size=world_size)


# -- AdamW on bf16 weights ----------------------------------------------------------------------

def _hash(x: torch.Tensor) -> torch.Tensor:
    """A counter-based random int32 per element (lowbias32; int32 arithmetic wraps)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -2073254261  # 0x846CA68B
    return x ^ ((x >> 16) & 0xFFFF)


def round_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding away from zero with probability equal to the dropped fraction of an
    ulp (bits: uniform in [0, 65535]), so the rounding error is zero on average."""
    return ((x.float().view(torch.int32) + bits) & -65536).view(torch.float32).to(torch.bfloat16)


def adamw_sr_(p, g, m, v, lr, step, seed: int, offset, beta1: float, beta2: float, eps: float,
              weight_decay: float) -> None:
    """One AdamW step (torch's formula) in place on flat bf16 weights p and moments m, v, from
    gradient g. lr and step are 0-d float tensors, offset a 0-d int32 tensor (a Python int would
    be folded into int32 index arithmetic by the compiler, which overflows). The random bits of element i depend only on
    (seed, step, offset + i), so a resumed or differently fused run makes the same draws."""
    g = g.float()
    m32 = m.float() * beta1 + g * (1 - beta1)
    v32 = v.float() * beta2 + g * g * (1 - beta2)
    update = (m32 / (1 - beta1 ** step)) / ((v32 / (1 - beta2 ** step)).sqrt() + eps)
    p32 = p.float() * (1 - lr * weight_decay) - lr * update
    key = _hash(step.to(torch.int32) * -1640531535 + seed)
    bits = _hash((torch.arange(p.numel(), device=p.device, dtype=torch.int32) + offset) * -1640531535 ^ key)
    p.copy_(round_stochastic(p32, bits & 0xFFFF))
    v.copy_(round_stochastic(v32, (bits >> 16) & 0xFFFF))  # v moves by ~(1 - beta2) per step: below an ulp
    m.copy_(m32)


def _gpu_update(device, seed: int):
    """adamw_sr_ as one Triton kernel (adamw_kernel: compiled in about a second, where
    torch.compile takes about 20 s with cold caches), tried once on a few weights; eager where
    Triton is missing or fails on this GPU."""
    try:
        from .adamw_kernel import adamw_sr_ as kernel

        x = torch.zeros(16, dtype=torch.bfloat16, device=device)
        one, offset = torch.ones((), device=device), torch.zeros((), dtype=torch.int32, device=device)
        kernel(x, x.clone(), x.clone(), x.clone(), one, one, seed, offset, 0.9, 0.999, 1e-8, 0.0)  # the run's variant
        return kernel
    except Exception as e:  # ImportError, or a compiler or driver error (a GPU Triton does not support)
        warnings.warn(f"the Triton AdamW kernel is not available ({str(e).splitlines()[0]}): AdamW runs eagerly")
        return adamw_sr_


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor (contiguous or channels-last) in memory order."""
    return t.detach().as_strided((t.numel(),), (1,), t.storage_offset())


def _slot(p: torch.Tensor) -> int:
    """Room for p in a flat buffer: a multiple of 16 elements keeps every slot 32-byte aligned."""
    return -(-p.numel() // 16) * 16


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 weights: bf16 moments, fp32 arithmetic, stochastic rounding of weights and
    second moments. Memory: weights, gradients and two moments in bf16 (8 bytes a weight, against
    16 for fp32 master weights, fp32 moments and bf16 gradients).

    By default a group's weights, gradients and moments are views into flat buffers, updated by
    one compiled kernel per group. With fused_backward, each weight is updated as soon as its
    gradient is accumulated and the gradient is dropped (gradient accumulation and global gradient
    clipping are then impossible).

    Like torch's AdamW, a parameter without a gradient (frozen: requires_grad False, or grad None)
    is not updated: its weight, moments and weight decay stay put. Unlike torch's, the bias
    correction counts the optimizer's steps rather than each parameter's, which differs only for
    a parameter that skips steps and later trains again.

    With accumulation_steps > 1 the micro-batches' gradients are summed in an fp32 buffer (4 more
    bytes a weight) instead of in bf16, where small contributions to a large sum vanish: the
    training module calls before_backward() and after_backward() around each micro-batch's
    backward, and zero_grad() starts a window. The last micro-batch adds to the fp32 sum rounded
    once.

    With world_size > 1 (train.FlatGradientDDP: DDP without torch's wrapper) the window's last
    backward averages the gradients over the ranks, in eight buckets of each group's flat buffer,
    each all-reduced as soon as its weights' gradients are in (_make_buckets); after_backward
    finishes and waits."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0, fused_backward: bool = False,
                 accumulation_steps: int = 1, world_size: int = 1):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if fused_backward and accumulation_steps > 1:
            raise ValueError("AdamWBF16: fused_backward cannot accumulate gradients")
        device = self.param_groups[0]["params"][0].device
        if fused_backward and world_size > 1:
            raise ValueError("AdamWBF16: fused_backward would step before the gradients are averaged over the ranks")
        self.fused_backward, self.accumulation_steps, self.world_size = fused_backward, accumulation_steps, world_size
        self.seed = (seed + 2**31) % 2**32 - 2**31  # as int32 (the schema allows up to 2**32 - 1)
        self._micro = 0  # backward passes since zero_grad
        self._step = torch.zeros((), device=device)
        self._lrs = [torch.zeros((), device=device) for _ in self.param_groups]
        self._update = _gpu_update(device, self.seed) if on_gpu(device) else adamw_sr_
        self._flat, self._offset, self._grads, self._slots, self._hooks = [], {}, [], [], []
        keys = ("exp_avg", "exp_avg_sq") if fused_backward else ("param", "grad", "exp_avg", "exp_avg_sq")
        offset = 0
        for i, group in enumerate(self.param_groups):
            n = sum(_slot(p) for p in group["params"])
            flat = {k: torch.zeros(n, dtype=torch.bfloat16, device=device) for k in keys}
            if accumulation_steps > 1:
                flat["grad_sum"] = torch.zeros(n, dtype=torch.float32, device=device)
            slots, at = [], 0
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise TypeError("AdamWBF16 needs bf16 parameters")
                stride = torch.empty_like(p).stride()  # p's own if dense, else contiguous
                view = {k: flat[k].as_strided(p.shape, stride, at) for k in keys}
                if not fused_backward:
                    view["param"].copy_(p.detach())
                    p.data, p.grad = view.pop("param"), view.pop("grad")
                    self._grads.append((p, p.grad))
                    FLAT_GRADS[p] = p.grad
                else:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._step_one(i)))
                    STEPPED_IN_BACKWARD[p] = True
                self.state[p] = {"exp_avg": view["exp_avg"], "exp_avg_sq": view["exp_avg_sq"], "step": self._step}
                self._offset[p] = torch.tensor(offset + at, dtype=torch.int32, device=device)
                slots.append((p, at, at + _slot(p)))
                at += _slot(p)
            self._flat.append(flat)
            self._slots.append(slots)
            offset += n
        self._buckets = self._make_buckets() if world_size > 1 else []
        self._works = []
        # the hooks hold the optimizer weakly and go with it: a dropped one must not step the weights
        weakref.finalize(self, _remove, self._hooks)

    # -- DDP: the gradients averaged in buckets, the first while the backward still runs ----------

    BUCKETS_PER_GROUP = 8

    def _make_buckets(self) -> list[dict]:
        """Consecutive runs of each group's weights, about an eighth of it each. A hook after each
        weight's gradient is accumulated counts down its bucket, and a complete bucket's all-reduce
        starts at once, on NCCL's stream: behind the accumulation of the weights after it, which
        keeps the CPU busy for about 10 ms of a 45 ms step at SD size with little for the GPU."""
        buckets = []
        for i, slots in enumerate(self._slots):
            size = -(-slots[-1][2] // self.BUCKETS_PER_GROUP)
            for p, start, end in slots:
                if not buckets or buckets[-1]["group"] != i or buckets[-1]["end"] - buckets[-1]["start"] >= size:
                    buckets.append({"group": i, "start": start, "end": start, "params": []})
                buckets[-1]["end"] = end
                buckets[-1]["params"].append(p)
        for b, bucket in enumerate(buckets):
            bucket["left"] = sum(p.requires_grad for p in bucket["params"])  # zero_grad counts again
            for p in bucket["params"]:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._arrived(bucket, b, FLAT_GRADS[p])))
        return buckets

    def _arrived(self, bucket: dict, b: int, view: torch.Tensor):
        """A weight's hook: it runs 686 times a step at SD size, so it does little (no grad-mode
        context, nothing looked up: about 1 us)."""
        me = weakref.ref(self)

        def hook(p):
            self = me()
            if self is None or self._micro != self.accumulation_steps - 1:  # not the window's last backward
                return
            if bucket["left"] is None:  # as torch's DDP: a second gradient would miss the average
                raise RuntimeError("AdamWBF16 under DDP: a weight got a second gradient in one backward "
                                   "(reentrant checkpointing?) after its bucket was averaged")
            if p.grad is not view:
                self._reclaim(p, view)
            bucket["left"] -= 1
            if bucket["left"] == 0:
                self._average(b)
        return hook

    @torch.no_grad()
    def _average(self, b):
        bucket = self._buckets[b]
        grad = self._flat[bucket["group"]]["grad"][bucket["start"]:bucket["end"]]
        grad.div_(self.world_size)  # as DDP: divide, then sum
        self._works.append(torch.distributed.all_reduce(grad, async_op=True))
        bucket["left"] = None

    def _average_the_rest(self):
        """After the window's last backward: the buckets no hook completed (weights without a
        gradient; all of them when the backward hands the gradients over without autograd, as
        FlatGradients does), but none of a frozen group; then the stream waits for all. Every
        rank starts the same all-reduces in the same order, the order its backward completes the
        buckets in: the same graph on every rank (torch's DDP fixes the order instead, for
        models whose backward differs between ranks, which the UNet's does not). A gradient
        autograd replaced is back in the buffer already (the hook after its accumulation)."""
        trained = [bool(self._runs(i)) for i in range(len(self._flat))]
        for b, bucket in enumerate(self._buckets):
            if bucket["left"] is not None and trained[bucket["group"]]:
                self._average(b)
        for work in self._works:
            work.wait()
        self._works = []

    def _update_slice(self, i, p, g, m, v, offset):
        group = self.param_groups[i]
        self._update(p, g, m, v, self._lrs[i], self._step, self.seed, offset, *group["betas"], group["eps"],
                     group["weight_decay"])

    def _step_one(self, i):
        me = weakref.ref(self)

        @torch.no_grad()
        def hook(p):
            self = me()
            if self is None:
                return
            if _DRY_RUN[0]:
                p.grad = None
                return
            st = self.state[p]
            self._update_slice(i, _flat(p), _flat(p.grad), _flat(st["exp_avg"]), _flat(st["exp_avg_sq"]), self._offset[p])
            p.grad = None
        return hook

    @torch.no_grad()
    def step(self, closure=None):
        self._step += 1  # before the closure: fused_backward updates run inside it
        for lr, group in zip(self._lrs, self.param_groups):
            lr.fill_(group["lr"])
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.fused_backward:
            self._collect_grads()
            for i, flat in enumerate(self._flat):
                for p, start, end in self._runs(i):
                    self._update_slice(i, *(flat[k][start:end] for k in ("param", "grad", "exp_avg", "exp_avg_sq")),
                                       self._offset[p])
        return loss

    def _runs(self, i):
        """(first parameter, start, end) of each run of consecutive parameters of group i that have
        a gradient: one run for the whole buffer when all of them do, none when the group is frozen."""
        runs = []
        for p, start, end in self._slots[i]:
            if not (p.requires_grad and p.grad is not None):
                continue
            if runs and runs[-1][2] == start:
                runs[-1][2] = end
            else:
                runs.append([p, start, end])
        return runs

    def _collect_grads(self):
        for p, view in self._grads:
            if p.grad is not None and p.grad is not view:
                self._reclaim(p, view)

    @staticmethod
    @torch.no_grad()
    def _reclaim(p, view):
        """A gradient someone replaced (e.g. autograd, for a parameter whose grad was None) goes
        back into the flat buffer."""
        view.copy_(p.grad)
        p.grad = view

    @torch.no_grad()
    def before_backward(self):
        """Before a micro-batch's backward: the bf16 gradients receive this micro-batch alone, or
        for the last one of the window the fp32 sum so far."""
        if self.accumulation_steps == 1 or self._micro == 0:
            return
        last = self._micro == self.accumulation_steps - 1
        self._collect_grads()
        for flat in self._flat:
            flat["grad"].copy_(flat["grad_sum"]) if last else flat["grad"].zero_()

    @torch.no_grad()
    def after_backward(self):
        """After a micro-batch's backward: add its gradients to the fp32 sum (but the last's, which
        the step takes from the bf16 gradients); after the last, average them over the ranks."""
        if self.accumulation_steps > 1 and self._micro < self.accumulation_steps - 1:
            self._collect_grads()
            for flat in self._flat:
                flat["grad_sum"].add_(flat["grad"]) if self._micro else flat["grad_sum"].copy_(flat["grad"])
        self._micro += 1
        if self.world_size > 1 and self._micro == self.accumulation_steps:
            self._average_the_rest()

    def zero_grad(self, set_to_none: bool = True):
        """Gradients stay views of the flat buffer (autograd accumulates into them in place), but
        a frozen parameter's is None, as torch leaves it after a backward with set_to_none."""
        self._micro = 0
        for flat in self._flat:
            if "grad" in flat:
                flat["grad"].zero_()
        for p, view in self._grads:
            p.grad = view if p.requires_grad else None
        for bucket in self._buckets:
            bucket["left"] = sum(p.requires_grad for p in bucket["params"])

    def load_state_dict(self, state_dict):
        views = {p: dict(st) for p, st in self.state.items()}
        super().load_state_dict(state_dict)
        for p, st in views.items():
            for k in ("exp_avg", "exp_avg_sq"):
                st[k].copy_(self.state[p][k])
            self._step.copy_(self.state[p]["step"])
            st["step"] = self._step
            self.state[p] = st
