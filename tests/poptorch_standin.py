"""A CPU STAND-IN for Graphcore's PopTorch API, for tests only. It is not PopTorch.

PopTorch ships only with the Poplar SDK and cannot be installed here, so the IPU
path of finetune_electra.py is checked against this module, injected as
`poptorch` in sys.modules. It runs everything eagerly on the CPU and enforces the
contracts of real PopTorch that the script relies on (see
../shared/docs/poptorch-notes.md, read from PopTorch's source):

- a DataLoader item holds batch_size * deviceIterations * gradientAccumulation
  rows, and the Options it was given are frozen;
- a model's batch dimension must be a multiple of that product, and its input
  shapes are fixed when it is compiled (static graphs);
- the training model runs backward and the optimizer step itself, on a device
  copy of the weights that reaches the host only on detach; the inference model
  reads the host weights;
- compile/attach/detach errors use PopTorch's messages, and only one model can
  hold the IPUs at a time;
- pipelined training needs gradientAccumulation >= 2 * IPUs - 1, inference
  needs deviceIterations >= IPUs, and an inference model refuses accumulation;
- output modes: Final (training default) returns the last micro-batch, All
  (inference default) returns every micro-batch; `anchorMode` is absent, as in
  SDK 2.5 and later;
- exactly one identity_loss per training forward.

Every call is logged in EVENTS so tests can check the order of the flow.
"""

import copy
import enum
import warnings

import torch

EVENTS = []          # ("compile" | "attach" | "detach" | "call", "training" | "inference")
IDENTITY_LOSSES = []  # reduction of each identity_loss call
_holder = [None]      # the executor attached to the IPUs, if any
_losses_in_forward = []


def reset():
    EVENTS.clear()
    IDENTITY_LOSSES.clear()
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
    IDENTITY_LOSSES.append(reduction)
    out = {"sum": x.sum, "mean": x.mean, "none": x.clone}[reduction]()
    _losses_in_forward.append(out)
    return out


def BeginBlock(module, user_id=None, ipu_id=None):
    module._standin_ipu = ipu_id
    module._standin_block = user_id
    return module


class _AdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, loss_scaling=None, **kwargs):
        super().__init__(params, lr=lr, **kwargs)

    def step(self, closure=None):
        raise RuntimeError("stand-in: a poptorch training model steps its optimizer itself; "
                           "do not call optimizer.step()")


class optim:  # noqa: N801 - mirrors poptorch.optim
    AdamW = _AdamW


def _ipus_used(module):
    return len({getattr(m, "_standin_ipu", None) for m in module.modules()} - {None}) or 1


class _Executor:
    def __init__(self, model, options, training, optimizer=None):
        self.model = model
        self.options = options or Options()
        self.training = training
        self.optimizer = optimizer
        self.name = "training" if training else "inference"
        self.compiled_shapes = None
        self.attached = False
        self._device_model = self._device_optimizer = None
        if not training and self.options.Training.gradient_accumulation != 1:
            raise RuntimeError("Gradient accumulation is not supported for inference models")

    def _check(self, args):
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

    def compile(self, *args):
        if self.compiled_shapes is not None:
            warnings.warn("Model has already been compiled: compile() does nothing")
            return
        ipus = _ipus_used(self.model)
        if self.training and ipus > 1 and self.options.Training.gradient_accumulation < 2 * ipus - 1:
            raise RuntimeError(f"Pipelined training over {ipus} IPUs needs gradientAccumulation "
                               f">= {2 * ipus - 1} (number of pipeline stages)")
        if not self.training and self.options.device_iterations < ipus:
            raise RuntimeError(f"Inference over {ipus} pipelined IPUs needs deviceIterations >= {ipus}")
        self.compiled_shapes = self._check(args)
        EVENTS.append(("compile", self.name))
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
        if self.training:  # upload the host weights and optimizer state
            self._device_model = copy.deepcopy(self.model)
            groups = self.optimizer.param_groups[0]
            self._device_optimizer = torch.optim.AdamW(
                self._device_model.parameters(),
                **{k: groups[k] for k in ("lr", "betas", "eps", "weight_decay")})
            self._device_optimizer.load_state_dict(self.optimizer.state_dict())

    def detachFromDevice(self):
        if not self.attached:
            raise RuntimeError("Device is not attached")
        if self.training:  # the trained weights come back to the host
            self.model.load_state_dict(self._device_model.state_dict())
            torch.optim.AdamW.load_state_dict(self.optimizer, self._device_optimizer.state_dict())
            self._device_model = self._device_optimizer = None
        _holder[0], self.attached = None, False
        EVENTS.append(("detach", self.name))

    def __call__(self, *args):
        if self.compiled_shapes is None:
            self.compile(*args)
        elif not self.attached:
            self.attachToDevice()
        self._check(args)
        EVENTS.append(("call", self.name))
        steps = self.options.device_iterations * self.options.replication_factor
        accumulation = self.options.Training.gradient_accumulation
        micro = [chunk for step in zip(*(a.chunk(steps) for a in args))
                 for chunk in zip(*(a.chunk(accumulation) for a in step))]
        outputs = self._train(micro, accumulation) if self.training else self._infer(micro)
        mode = self.options.output_mode
        if mode == OutputMode.Default:
            mode = OutputMode.Final if self.training else OutputMode.All
        if mode == OutputMode.Final:
            return outputs[-1]
        return tuple(torch.cat([torch.atleast_1d(o[i]) for o in outputs])
                     for i in range(len(outputs[0])))

    def _train(self, micro, accumulation):
        model, optimizer, outputs = self._device_model, self._device_optimizer, []
        model.train()
        for i, batch in enumerate(micro):
            _losses_in_forward.clear()
            out = model(*batch)
            if len(_losses_in_forward) != 1:
                raise RuntimeError(f"the training graph must have exactly one loss "
                                   f"(identity_loss), found {len(_losses_in_forward)}")
            (_losses_in_forward[0].mean() / accumulation).backward()  # gradients are averaged
            if (i + 1) % accumulation == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            outputs.append(tuple(o.detach() for o in out))
        return outputs

    @torch.no_grad()
    def _infer(self, micro):
        self.model.eval()
        return [tuple(self.model(*batch)) for batch in micro]


def trainingModel(model, options=None, optimizer=None):
    if optimizer is None:
        raise ValueError("stand-in: pass the optimizer to trainingModel")
    return _Executor(model, options, training=True, optimizer=optimizer)


def inferenceModel(model, options=None):
    return _Executor(model, options, training=False)
