"""A CPU STAND-IN for Graphcore's PopTorch API, for tests only. It is not PopTorch.

PopTorch ships only with the Poplar SDK and cannot be installed here, so the IPU
path of finetune_electra.py is checked against this module, injected as
`poptorch` in sys.modules. It runs everything eagerly on the CPU and enforces the
contracts of real PopTorch that the script relies on (../shared/docs/poptorch-notes.md,
read from PopTorch's source, tag sdk/poptorch/3.4.0; the file is named for each):

- import: asserts that torch is the version PopTorch was built for, raising
  AssertionError, not ImportError (python/__init__.py);
- a DataLoader item holds batch_size * deviceIterations * replicationFactor *
  gradientAccumulation rows, and the Options it was given are frozen (python/__init__.py);
- replication: each device iteration's rows are split into accumulation x replicas
  micro-batches (in that order, as popart lays out a step's input), every replica gets
  rows of its own, and their gradients are averaged with the accumulated ones into one
  optimizer step (ReductionType.Mean, the default of options.py); output mode All
  returns every replica's rows;
- enableExecutableCaching(path) is recorded in CACHES when a model compiles;
- a model's batch dimension must be a multiple of that product, and its input
  shapes are fixed when it is compiled (static graphs);
- inputs may be given by position or by name: they are bound to forward's signature,
  defaults filled in, and every call must give the names the compile was given
  (python/_args_parser.py);
- trainingModel and inferenceModel each take a shallow copy of the module and
  never call .train()/.eval() (python/__init__.py): the graph is traced once, at
  compile, in the modes the modules are in then, and every call runs that graph;
- identity_loss is traced once per compile; a training graph needs exactly one;
- PopTorch has no handler for scaled_dot_product_attention: tracing one fails;
- nor for the ops in UNSUPPORTED_OPS (not in docs/user_guide/supported_ops.rst, no handler
  in poptorch/source): tracing a graph with one fails with PopTorch's "Unsupported ops
  found in compiled model"; and cumsum over integers is refused too: PopTorch lowers any
  cumsum to a float32 convolution with a kernel of ones as long as the dimension
  (ConvolutionOps.cpp), tested on a 1x5x6 input only;
- the training model runs backward and the optimizer step itself, on a device
  copy of the weights and optimizer state that reach the host only on detach; one
  call runs deviceIterations optimizer steps of gradientAccumulation micro-batches
  each (docs/user_guide/batching.rst); the inference model reads the host weights;
- poptorch.optim.AdamW keeps the Adam moments in `ipu_state`/`ipu_param` of its
  state_dict() (torch's `state` stays empty), and load_state_dict refuses a state
  without them (python/optim.py);
- the optimizer's attributes on the device are those at compile; a change on the host
  reaches the device only through setOptimizer, which refuses to change an attribute
  left out of the constructor (constant); per group: lr, betas, eps, weight_decay,
  amsgrad; max_grad_norm (clipping over all gradients, on the device) is one value
  (python/optim.py, docs/user_guide/overview.rst "Optimizers");
- compile/attach/detach errors use PopTorch's messages, and only one model can
  hold the IPUs at a time (python/_poplar_executor.py);
- the IPUs a model uses (IPUs x replicas) must be a power of two unless
  autoRoundNumIPUs(True) (popart_compiler/source/CompilerImpl.cpp);
- pipelined training needs gradientAccumulation >= 2 * IPUs - 1, inference
  needs deviceIterations >= IPUs, and an inference model refuses accumulation;
- output modes: Final (training default) returns the last micro-batch, All
  (inference default) returns every micro-batch; `anchorMode` is absent, as in
  SDK 2.5 and later.

Every compile, attach, detach and call is logged in EVENTS so tests can check the
order of the flow. For tests that run the script in a subprocess: the environment
variable POPTORCH_STANDIN_TORCH sets the torch version this "PopTorch" asserts, and
POPTORCH_STANDIN_SIGKILL_AT_ATTACH=N kills the process at the training model's N-th attach.
"""

import contextlib
import copy
import enum
import inspect
import os
import signal
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# python/__init__.py: `assert torch.__version__.startswith("@TORCH_VERSION@"), ...`
TORCH_VERSION = os.environ.get("POPTORCH_STANDIN_TORCH", torch.__version__)
assert torch.__version__.startswith(TORCH_VERSION), (
    f"This version of PopTorch only works with torch=={TORCH_VERSION} but the version "
    f"installed is {torch.__version__}")

EVENTS = []           # ("compile" | "attach" | "detach" | "call", "training" | "inference")
CACHES = []           # (model name, executable cache path) at each compile
IDENTITY_LOSSES = []  # (model name, reduction) of each identity_loss in a traced graph
DEVICE_LRS = []       # the lr of each optimizer step the device ran (its first group's)
_holder = [None]      # the executor attached to the IPUs, if any
_tracing = [None]     # the name of the model being traced, while it is
_losses_in_forward = []


def reset():
    EVENTS.clear()
    CACHES.clear()
    IDENTITY_LOSSES.clear()
    DEVICE_LRS.clear()
    _holder[0] = None


class OutputMode(enum.Enum):
    Final = "Final"
    EveryN = "EveryN"
    All = "All"
    Sum = "Sum"
    Default = "Default"


class _TrainingOptions:
    def __init__(self, options):
        self._options = options
        self.gradient_accumulation = 1

    def gradientAccumulation(self, n):
        self._options._check_frozen()
        self.gradient_accumulation = n
        return self._options


class Options:
    def __init__(self):
        self.device_iterations = 1
        self.replication_factor = 1
        self.output_mode = OutputMode.Default
        self.auto_round_num_ipus = False
        self.executable_cache = None
        self.Training = _TrainingOptions(self)
        self._frozen = False

    def _check_frozen(self):
        if self._frozen:
            raise RuntimeError("Options are frozen: a poptorch.DataLoader already uses them")

    def deviceIterations(self, n):
        self._check_frozen()
        self.device_iterations = n
        return self

    def replicationFactor(self, n):
        self._check_frozen()
        self.replication_factor = n
        return self

    def outputMode(self, mode):
        self._check_frozen()
        self.output_mode = mode
        return self

    def autoRoundNumIPUs(self, value=True):
        self._check_frozen()
        self.auto_round_num_ipus = value
        return self

    def enableExecutableCaching(self, path):
        self._check_frozen()
        self.executable_cache = path
        return self

    def rows_per_call(self):
        return self.device_iterations * self.replication_factor * self.Training.gradient_accumulation


class DataLoader(torch.utils.data.DataLoader):
    def __init__(self, options, dataset, batch_size=1, shuffle=False, drop_last=True, **kwargs):
        options._frozen = True
        self.options = options
        super().__init__(dataset, batch_size=batch_size * options.rows_per_call(),
                         shuffle=shuffle, drop_last=drop_last, **kwargs)


def identity_loss(x, reduction):
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"identity_loss: unknown reduction {reduction!r}")
    if _tracing[0] is not None:
        IDENTITY_LOSSES.append((_tracing[0], reduction))
    out = {"sum": x.sum, "mean": x.mean, "none": x.clone}[reduction]()
    _losses_in_forward.append(out)
    return out


def BeginBlock(module, user_id=None, ipu_id=None):
    module._standin_ipu = ipu_id
    module._standin_block = user_id
    return module


GROUP_ATTRS = ("lr", "betas", "eps", "weight_decay", "amsgrad")  # python/optim.py _group_vars


class _AdamW(torch.optim.AdamW):
    """The host side of poptorch.optim.AdamW: the moments live on the IPU and come
    back, after a detach, as `ipu_state` (popart's Accl1/Accl2/Step tensors).

    As python/optim.py's _parseArgs: an attribute given explicitly to the constructor
    is variable (setOptimizer may change it), one left out is constant.
    max_grad_norm (default inf: no clipping) is one value for the whole optimizer."""

    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None,
                 max_grad_norm=None, loss_scaling=None, **kwargs):
        given = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                 "amsgrad": amsgrad, "max_grad_norm": max_grad_norm}
        self.variable_attrs = {name for name, value in given.items() if value is not None}
        super().__init__(params, **{k: v for k, v in given.items()
                                    if v is not None and k != "max_grad_norm"}, **kwargs)
        self.max_grad_norm = float("inf") if max_grad_norm is None else max_grad_norm
        self._ipu = {"ipu_state": None, "ipu_param": None}

    def state_dict(self):
        return {**self._ipu, **torch.optim.Optimizer.state_dict(self)}

    def load_state_dict(self, state):
        torch.optim.Optimizer.load_state_dict(self, state)
        if not state:
            raise RuntimeError("Cannot load optimizer state dictionary because it is empty.")
        if not ("ipu_state" in state and "ipu_param" in state):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        self._ipu = {"ipu_state": state["ipu_state"], "ipu_param": state["ipu_param"]}

    def step(self, closure=None):
        raise RuntimeError("stand-in: a poptorch training model steps its optimizer itself; "
                           "do not call optimizer.step()")


class optim:  # noqa: N801 - mirrors poptorch.optim
    AdamW = _AdamW


ADAM_STATE = {"exp_avg": "Accl1___", "exp_avg_sq": "Accl2___", "step": "Step___"}


# Ops a model may reach that PopTorch 3.4 has no handler for; the dynamic-shape ones
# (nonzero, masked_select, unique) cannot have one in a static graph.
UNSUPPORTED_OPS = ("aten::eye", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive")


class _RefuseUnsupportedOps(TorchDispatchMode):
    """While a graph is traced: every aten op the model runs, checked against PopTorch's."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in UNSUPPORTED_OPS:
            raise RuntimeError(f"Unsupported ops found in compiled model: [{name}]")
        if name == "aten::cumsum" and not args[0].is_floating_point():
            raise RuntimeError("stand-in: cumsum over integers: PopTorch computes every cumsum "
                               "as a float32 convolution with a kernel of ones as long as the "
                               "dimension (ConvolutionOps.cpp); compute such values on the host")
        return func(*args, **(kwargs or {}))


def _ipus_used(module):
    return len({getattr(m, "_standin_ipu", None) for m in module.modules()} - {None}) or 1


def _no_sdpa(*args, **kwargs):
    raise RuntimeError("stand-in: PopTorch has no handler for aten::scaled_dot_product_attention "
                       "(load the model with attn_implementation='eager')")


@contextlib.contextmanager
def _modes(modules, flags):
    """Run with each module in the mode the graph was traced in, then put the flags back."""
    before = [m.training for m in modules]
    for module, flag in zip(modules, flags):
        module.training = flag
    try:
        yield
    finally:
        for module, flag in zip(modules, before):
            module.training = flag


class _Executor:
    def __init__(self, model, options, training, optimizer=None):
        self.model = copy.copy(model)  # python/__init__.py: a shallow copy, flags not synced
        self.options = options or Options()
        self.training = training
        self.optimizer = optimizer
        self.name = "training" if training else "inference"
        self.compiled_shapes = self.compiled_names = self.traced_modes = None
        self.attached = False
        self.attaches = 0
        self._device_model = self._device_optimizer = None
        self._device_hparams = None  # the optimizer's values on the device: from compile,
        self.set_optimizer_calls = 0  # then only from setOptimizer
        if not training and self.options.Training.gradient_accumulation != 1:
            raise RuntimeError("Gradient accumulation is not supported for inference models")

    def _bind(self, args, kwargs):
        """Arguments by position or name, in forward's order, defaults filled in (as
        python/_args_parser.py); the same names must be given at every call."""
        names = list(inspect.signature(self.model.forward).parameters)
        for name in kwargs:
            if name not in names:
                raise AssertionError(f"{name} is not a valid parameter.Allowed values are {names}")
        given = tuple(n for i, n in enumerate(names) if i < len(args) or n in kwargs)
        if self.compiled_names is not None and given != self.compiled_names:
            raise RuntimeError(f"stand-in: compiled with arguments {self.compiled_names}, "
                               f"called with {given}")
        bound = inspect.signature(self.model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return given, list(bound.arguments.values())

    def _check(self, args):
        args = [a for a in args if a is not None]
        rows = args[0].shape[0]
        if rows % self.options.rows_per_call():
            raise RuntimeError(f"Invalid batch dimension: {rows} is not a multiple of "
                               f"{self.options.rows_per_call()} (device iterations x replication "
                               "x gradient accumulation)")
        shapes = [tuple(a.shape) for a in args]
        if self.compiled_shapes is not None and shapes != self.compiled_shapes:
            raise RuntimeError(f"stand-in: the {self.name} model was compiled for input shapes "
                               f"{self.compiled_shapes}, got {shapes} (IPU graphs are static)")
        return shapes

    def _check_ipus(self):
        ipus = _ipus_used(self.model) * self.options.replication_factor
        rounded = 1 << (ipus - 1).bit_length()
        if rounded != ipus and not self.options.auto_round_num_ipus:
            raise RuntimeError(
                f"The model specifies the use of {ipus} IPUs, however PopTorch must reserve a "
                f"minimum of {rounded} in order to allow the model to run, because PopTorch "
                "must reserve a power of 2 or maximum of 64 IPUs per process. Please "
                "reconfigure your model to use a different number of IPUs or set "
                "poptorch.Options().autoRoundNumIPUs(True).")
        stages = _ipus_used(self.model)
        if self.training and stages > 1 and \
                self.options.Training.gradient_accumulation < 2 * stages - 1:
            raise RuntimeError(f"Pipelined training over {stages} IPUs needs gradientAccumulation "
                               f">= {2 * stages - 1} (number of pipeline stages)")
        if not self.training and self.options.device_iterations < stages:
            raise RuntimeError(f"Inference over {stages} pipelined IPUs needs "
                               f"deviceIterations >= {stages}")

    def _trace(self, args):
        """Trace one micro-batch as PopTorch does at compile: in the modules' current modes."""
        modules = list(self.model.modules())
        self.traced_modes = [m.training for m in modules]
        micro = [a if a is None else a[:a.shape[0] // self.options.rows_per_call()] for a in args]
        _tracing[0], sdpa = self.name, torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _no_sdpa
        _losses_in_forward.clear()
        try:
            with torch.random.fork_rng(), torch.no_grad(), _RefuseUnsupportedOps():
                self.model(*micro)
        finally:
            _tracing[0], torch.nn.functional.scaled_dot_product_attention = None, sdpa
        if self.training and len(_losses_in_forward) != 1:
            raise RuntimeError(f"the training graph must have exactly one loss "
                               f"(identity_loss), found {len(_losses_in_forward)}")

    def compile(self, *args, **kwargs):
        if self.compiled_shapes is not None:
            warnings.warn("Model has already been compiled: compile() does nothing")
            return
        self._check_ipus()
        names, args = self._bind(args, kwargs)
        shapes = self._check(args)
        self._trace(args)
        if self.training:
            self._device_hparams = _hparams(self.optimizer)
        self.compiled_shapes, self.compiled_names = shapes, names
        EVENTS.append(("compile", self.name))
        CACHES.append((self.name, self.options.executable_cache))
        self.attachToDevice()

    def attachToDevice(self):
        if self.compiled_shapes is None:
            raise RuntimeError("Model has not been compiled or has been destroyed.")
        if self.attached:
            raise RuntimeError("Device is already attached")
        if _holder[0] is not None:
            raise RuntimeError(f"stand-in: the IPUs are held by the {_holder[0].name} model; "
                               "detach it first")
        _holder[0], self.attached = self, True
        EVENTS.append(("attach", self.name))
        if self.training:
            self.attaches += 1
            if self.attaches == int(os.environ.get("POPTORCH_STANDIN_SIGKILL_AT_ATTACH", 0)):
                os.kill(os.getpid(), signal.SIGKILL)
            self._upload()

    def setOptimizer(self, optimizer):
        """The host optimizer's variable attributes reach the device (python/_poplar_executor.py):
        the only way they do. A constant attribute (not given to the constructor) cannot change."""
        new = _hparams(optimizer)
        if self._device_hparams is not None:
            for name in ("max_grad_norm",) + GROUP_ATTRS:
                before = [g[name] for g in self._device_hparams["groups"]] \
                    if name != "max_grad_norm" else [self._device_hparams[name]]
                after = [g[name] for g in new["groups"]] if name != "max_grad_norm" \
                    else [new[name]]
                if before != after and name not in optimizer.variable_attrs:
                    raise RuntimeError(f"stand-in: {name} is a constant of the compiled graph "
                                       "(it was not given to the optimizer's constructor); "
                                       "setOptimizer cannot change it")
        self.optimizer, self._device_hparams = optimizer, new
        self.set_optimizer_calls += 1
        EVENTS.append(("setOptimizer", self.name))
        if self._device_optimizer is not None:
            for device_group, values in zip(self._device_optimizer.param_groups, new["groups"]):
                device_group.update(values)

    def _upload(self):
        """The host weights and optimizer state (from a checkpoint, or a previous detach) go to
        the device; the optimizer's attributes are the device's own (compile, setOptimizer)."""
        self._device_model = copy.deepcopy(self.model)
        device_params = dict(self._device_model.named_parameters())
        names = {id(p): name for name, p in self.model.named_parameters()}
        self._device_optimizer = torch.optim.AdamW(
            [{"params": [device_params[names[id(p)]] for p in group["params"]], **values}
             for group, values in zip(self.optimizer.param_groups,
                                      self._device_hparams["groups"])])
        ipu_state = self.optimizer._ipu["ipu_state"]
        if ipu_state:
            for name, param in self._device_model.named_parameters():
                if f"Step___{name}" in ipu_state:
                    self._device_optimizer.state[param] = {
                        key: ipu_state[prefix + name].clone() for key, prefix in ADAM_STATE.items()}

    def detachFromDevice(self):
        if not self.attached:
            raise RuntimeError("Device is not attached")
        if self.training:  # the trained weights and optimizer state come back to the host
            self.model.load_state_dict(self._device_model.state_dict())
            names = {param: name for name, param in self._device_model.named_parameters()}
            self.optimizer._ipu = {
                "ipu_state": {prefix + names[param]: values[key].detach().clone()
                              for param, values in self._device_optimizer.state.items()
                              for key, prefix in ADAM_STATE.items()},
                "ipu_param": {"learningRate": torch.tensor(self._device_hparams["groups"][0]["lr"])},
            }
            self._device_model = self._device_optimizer = None
        _holder[0], self.attached = None, False
        EVENTS.append(("detach", self.name))

    def __call__(self, *args, **kwargs):
        if self.compiled_shapes is None:
            self.compile(*args, **kwargs)
        elif not self.attached:
            self.attachToDevice()
        args = self._bind(args, kwargs)[1]
        self._check(args)
        EVENTS.append(("call", self.name))
        # A step's rows: [accumulation][replicas][micro-batch]; one optimizer step each.
        per_step = self.options.Training.gradient_accumulation * self.options.replication_factor
        calls = self.options.device_iterations * per_step
        micro = list(zip(*(a.chunk(calls) if a is not None else [None] * calls for a in args)))
        if self.training:  # (eval rows may repeat: a padded last host batch)
            self._check_replicas_differ(micro)
        model = self._device_model if self.training else self.model
        with _modes(list(model.modules()), self.traced_modes):
            outputs = self._train(micro, per_step) if self.training else self._infer(micro)
        mode = self.options.output_mode
        if mode == OutputMode.Default:
            mode = OutputMode.Final if self.training else OutputMode.All
        if mode == OutputMode.Final:
            return outputs[-1]
        return tuple(torch.cat([torch.atleast_1d(o[i]) for o in outputs])
                     for i in range(len(outputs[0])))

    def _check_replicas_differ(self, micro):
        replicas = self.options.replication_factor
        for start in range(0, len(micro), replicas):
            group = [m[0] for m in micro[start:start + replicas]]
            if any(torch.equal(a, b) for i, a in enumerate(group) for b in group[i + 1:]):
                raise RuntimeError("stand-in: two replicas got the same rows in one step")

    def _train(self, micro, per_step):
        model, optimizer, outputs = self._device_model, self._device_optimizer, []
        for i, batch in enumerate(micro):
            _losses_in_forward.clear()
            out = model(*batch)
            # ReductionType.Mean: gradients averaged over accumulation and replicas
            (_losses_in_forward[0].mean() / per_step).backward()
            if (i + 1) % per_step == 0:
                clip = self._device_hparams["max_grad_norm"]
                if clip != float("inf"):  # on the device, the norm over all the gradients
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                DEVICE_LRS.append(optimizer.param_groups[0]["lr"])
                optimizer.zero_grad(set_to_none=True)
            outputs.append(tuple(o.detach() for o in out))
        return outputs

    @torch.no_grad()
    def _infer(self, micro):
        return [tuple(self.model(*batch)) for batch in micro]


def _hparams(optimizer):
    return {"groups": [{name: group[name] for name in GROUP_ATTRS}
                       for group in optimizer.param_groups],
            "max_grad_norm": optimizer.max_grad_norm}


def trainingModel(model, options=None, optimizer=None):
    if optimizer is None:
        raise ValueError("stand-in: pass the optimizer to trainingModel")
    return _Executor(model, options, training=True, optimizer=optimizer)


def inferenceModel(model, options=None):
    return _Executor(model, options, training=False)
