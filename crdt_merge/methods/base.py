"""The method interface: parameter specs, tensor jobs, bound parameters and the registry.

A :class:`Method` is plain maths behind a name. The resolver hands it one :class:`TensorJob`
(one output tensor, inputs in canonical order and in their stored float dtype) and gets the
output in the job's dtype, rounded once from float64. A method never sees the store, the op
set or the order in which ops arrived.

Every value of a bfloat16, float16 or float32 input is exactly a float64, so where the
inputs are widened changes no bit: a *streaming* method widens a block at a time (and
rounds its output a block at a time), the others get whole float64 tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from crdt_merge.errors import BadParameter, RecipeError, ShapeMismatch, UnknownMethod
from crdt_merge.lazy import torch
from crdt_merge.methods.params import Scalar, leaves, parse_scalar
from crdt_merge.numeric import RAW_DTYPES, raw_view, round_to

Scope = Literal["global", "per_model"]
BasePolicy = Literal["required", "optional", "ignored"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: object = _Required()
"""Sentinel default of a parameter that has no default."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    Attributes:
        name: the key users write in a recipe (mergekit's spelling).
        scope: ``"global"`` (one value for the tensor) or ``"per_model"`` (one per donor; a
            global value is the fallback for every donor, as in mergekit).
        type: ``float``, ``int`` or ``bool``.
        default: the value when the recipe is silent; :data:`REQUIRED` if it must be given;
            ``None`` for an optional value that means "not set".
        low, high: the valid closed range (``None`` = unbounded); ``low_open``/``high_open``
            make that end open.
        doc: one line for ``crdt-merge`` help and the spec.
    """

    name: str
    scope: Scope
    type: type
    default: object = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return "a name"
        if self.low is None and self.high is None:
            return "any finite number"
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{lo}, {hi}"

    def coerce(self, value: object, where: str) -> Scalar:
        """Parse one scalar (canonical decimal string, number or bool) and check its range."""
        try:
            parsed = parse_scalar(value, self.type)
        except ValueError as exc:
            raise BadParameter(f"{where}: parameter {self.name!r}: {exc}") from None
        if self.type in (int, float):
            x = float(parsed)
            bad = (
                self.low is not None and (x < self.low or (self.low_open and x == self.low))
            ) or (self.high is not None and (x > self.high or (self.high_open and x == self.high)))
            if bad:
                raise BadParameter(
                    f"{where}: parameter {self.name!r} is {value!r}, outside its valid range "
                    f"{self.range_text()}"
                )
        return parsed


@dataclass(frozen=True)
class TensorJob:
    """Everything a method needs to merge one tensor.

    Attributes:
        name: the output tensor's name (used in error messages only).
        base: the anchor/base tensor (any float dtype; its values are exact float64
            values), or ``None`` when the method takes none.
        donors: the full donor weights, in canonical order (not deltas), any float dtype.
        params: per-donor scalar parameters already resolved for this tensor.
        options: global parameters already resolved for this tensor.
        keys: one 32-byte key per donor for counter-based randomness (random methods only).
        layer_index, num_layers: where the tensor sits, when a method needs it.
        out_dtype: the dtype of the result (default float64); float64 values are rounded
            to it once.
        out: where to put the result (a flat contiguous tensor of ``out_dtype`` with one
            element per input element), or ``None`` for a new tensor. Streaming kernels
            write into it; :meth:`Method.merge` copies any other kernel's result there.
    """

    name: str
    base: torch.Tensor | None
    donors: Sequence[torch.Tensor]
    params: Sequence[Mapping[str, object]] = ()
    options: Mapping[str, object] = field(default_factory=dict)
    keys: Sequence[bytes] = ()
    layer_index: int | None = None
    num_layers: int | None = None
    out_dtype: torch.dtype = None  # type: ignore[assignment]  # float64, set below
    out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.out_dtype is None:  # the default, spelt here so importing never loads torch
            object.__setattr__(self, "out_dtype", torch.float64)

    def output(self, n: int) -> torch.Tensor:
        """The flat output tensor of ``n`` elements: :attr:`out`, else a new one."""
        return torch.empty(n, dtype=self.out_dtype) if self.out is None else self.out


@dataclass(frozen=True)
class Bound:
    """A job's parameters with defaults applied, types parsed and ranges checked."""

    options: Mapping[str, Scalar | None]
    per_donor: Sequence[Mapping[str, Scalar | None]]

    def column(self, name: str) -> list:
        """One per-donor parameter for every donor, in canonical order."""
        return [p[name] for p in self.per_donor]


Kernel = Callable[[TensorJob, Bound], "torch.Tensor"]


@dataclass(frozen=True)
class Raw:
    """A flat array of one float dtype's stored bits (numpy; bfloat16 as ``uint16``).

    Attributes:
        values: the array (:data:`crdt_merge.numeric.RAW_DTYPES` gives its numpy dtype).
        dtype: the safetensors name: ``"F64"``, ``"F32"``, ``"F16"`` or ``"BF16"``.
    """

    values: np.ndarray
    dtype: str


RawKernel = Callable[[Bound, "Raw | None", Sequence[Raw], Raw], None]
"""``raw_kernel(bound, base, donors, out)``: an elementwise method's maths; fills ``out``."""


def _named(name: str, raw_kernel: RawKernel, *args: object) -> None:
    """Run a raw kernel; a parameter it refuses is reported with the tensor's name."""
    try:
        raw_kernel(*args)  # type: ignore[arg-type]
    except BadParameter as exc:
        raise BadParameter(f"{name}: {exc}") from None


def via_raw(raw_kernel: RawKernel) -> Kernel:
    """The tensor kernel of an elementwise method (streaming: inputs in their stored
    dtype) that runs its raw kernel on numpy views of the tensors."""

    def kernel(job: TensorJob, bound: Bound) -> torch.Tensor:
        inputs = [job.base, *job.donors] if job.base is not None else list(job.donors)
        shape = inputs[0].shape
        out = job.output(inputs[0].numel())
        raws = [Raw(*raw_view(t.contiguous())) for t in inputs]
        base = raws.pop(0) if job.base is not None else None
        _named(job.name, raw_kernel, bound, base, raws, Raw(*raw_view(out)))
        return out.reshape(shape)

    return kernel


Check = Callable[[Mapping[str, Scalar | None], Mapping[str, Scalar | None], str], None]


@dataclass(frozen=True)
class Method:
    """A merge method: its maths, its parameters and what inputs it accepts.

    Attributes:
        name: the registry key, exactly as users write it (``"dare_ties"``).
        paper: the URL of the paper (or note) the method comes from.
        base: ``"required"``, ``"optional"`` or ``"ignored"`` (an ignored base is, as in
            mergekit, one more ordinary input: the caller passes it among ``donors``).
        params: the parameters, global and per model.
        min_donors, max_donors: how many donors (non-base inputs) the method accepts.
        random: whether the method draws random masks (then ``job.keys`` is required).
        kernel: the maths, ``kernel(job, bound) -> tensor``: float64, or already in
            ``job.out_dtype`` (a streaming kernel rounds block by block).
        check: an optional cross-parameter rule on one donor's resolved values.
        streaming: the kernel takes its inputs in their stored dtype and widens them a
            block at a time (:func:`crdt_merge.methods.reduce.f64`); other kernels are
            handed whole float64 tensors.
        raw_kernel: for an elementwise method (output element ``k`` depends only on
            element ``k`` of each input and on the tensor's parameters), its maths over
            numpy arrays of stored bits, ``raw_kernel(bound, base, donors, out)``
            (:class:`Raw` each; it fills ``out``). Merging any split of the flat inputs
            into ranges then gives the bytes of the whole, so resolve streams such a
            tensor piece by piece from the store, without torch; ``kernel`` is then
            :func:`via_raw` of it, so both paths run the same code.
        blas: the bytes go through BLAS/LAPACK (matrix products, eigensolvers), so they
            match only within one numeric profile, which then names the BLAS build.
    """

    name: str
    paper: str
    base: BasePolicy
    params: tuple[ParamSpec, ...]
    kernel: Kernel = field(repr=False)
    min_donors: int = 1
    max_donors: int | None = None
    random: bool = False
    check: Check | None = field(default=None, repr=False)
    streaming: bool = False
    raw_kernel: RawKernel | None = field(default=None, repr=False)
    blas: bool = False

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    # -- recipe-level validation ----------------------------------------------------------

    def validate_recipe(self, global_params: Mapping[str, object]) -> None:
        """Check a recipe's own ``parameters:`` (no donor needed).

        Per-model parameters may be given here too: they are every donor's fallback.

        Raises:
            BadParameter: an unknown name, a value of the wrong type or out of range, or a
                missing required global parameter. The message names the parameter.
        """
        known = {p.name: p for p in self.params}
        for key, value in global_params.items():
            spec = known.get(key)
            if spec is None:
                raise BadParameter(self._unknown(key, "the recipe's parameters"))
            self._check_value(spec, value, f"{self.name} recipe")
        for spec in self.params:
            if spec.scope == "global" and spec.required and spec.name not in global_params:
                raise BadParameter(
                    f"{self.name} recipe: parameter {spec.name!r} is required "
                    f"({spec.doc or spec.range_text()})"
                )

    def validate(
        self, global_params: Mapping[str, object], per_model: Sequence[Mapping[str, object]]
    ) -> None:
        """Check a recipe's parameters and its donors' before any tensor is touched.

        Args:
            global_params: the recipe's ``parameters:`` (values may be scalars, layer
                gradients or ``{filter, value}`` lists, as in mergekit).
            per_model: each donor's own ``parameters:``, one mapping per donor.

        Raises:
            BadParameter: an unknown name, a global parameter set on a model, a value of
                the wrong type or out of range, a missing required value, or a donor count
                this method does not accept. The message names the parameter.
        """
        self._check_count(len(per_model))
        self.validate_recipe(global_params)
        known = {p.name: p for p in self.params}
        for index, params in enumerate(per_model):
            where = f"{self.name} model #{index}"
            for key, value in params.items():
                spec = known.get(key)
                if spec is None:
                    raise BadParameter(self._unknown(key, f"model #{index}'s parameters"))
                if spec.scope == "global":
                    raise BadParameter(
                        f"{where}: {key!r} is a global parameter of {self.name}; set it in "
                        "the recipe's parameters, not a model's"
                    )
                self._check_value(spec, value, where)
            for spec in self.params:
                if spec.scope == "per_model" and spec.required:
                    if spec.name not in params and spec.name not in global_params:
                        raise BadParameter(
                            f"{where}: parameter {spec.name!r} is required "
                            f"({spec.doc or spec.range_text()})"
                        )
            if self.check is not None:
                scalars = self._scalar_view(global_params, params)
                if scalars is not None:
                    self.check(scalars[0], scalars[1], where)

    def _unknown(self, key: str, where: str) -> str:
        names = ", ".join(sorted(p.name for p in self.params)) or "none"
        return f"{self.name} has no parameter {key!r} (in {where}); its parameters are: {names}"

    def _check_count(self, count: int) -> None:
        low, high = self.min_donors, self.max_donors
        if count < low or (high is not None and count > high):
            want = (
                f"exactly {low}"
                if low == high
                else f"at least {low}"
                if high is None
                else f"between {low} and {high}"
            )
            raise BadParameter(f"{self.name} takes {want} donor model(s), got {count}")

    def _check_value(self, spec: ParamSpec, value: object, where: str) -> None:
        try:
            found = leaves(value)
        except ValueError as exc:
            raise BadParameter(f"{where}: parameter {spec.name!r}: {exc}") from None
        for leaf in found:
            if leaf is None and spec.default is None:
                continue
            spec.coerce(leaf, where)

    def _scalar_view(
        self, global_params: Mapping[str, object], params: Mapping[str, object]
    ) -> tuple[dict, dict] | None:
        """Scalar values for the cross-parameter check, or None if any is not a scalar."""
        opts: dict = {}
        mine: dict = {}
        for spec in self.params:
            raw = params.get(spec.name, global_params.get(spec.name, spec.default))
            if raw is REQUIRED:
                return None
            if isinstance(raw, (list, tuple, dict)):
                return None
            value = None if raw is None else spec.coerce(raw, self.name)
            (opts if spec.scope == "global" else mine)[spec.name] = value
        return opts, mine

    # -- per-tensor execution -------------------------------------------------------------

    def bind(self, job: TensorJob) -> Bound:
        """Apply defaults and check types and ranges of one job's resolved parameters."""
        return self.bind_values(job.name, job.options, job.params)

    def bind_values(self, name: str, options_in: Mapping[str, object],
                    params_in: Sequence[Mapping[str, object]]) -> Bound:
        """:meth:`bind` of a tensor ``name``'s global and per-donor parameter values."""
        options: dict[str, Scalar | None] = {}
        for spec in self.params:
            if spec.scope == "global":
                options[spec.name] = self._bind_one(spec, options_in, {}, name)
        known = {p.name for p in self.params}
        for key in options_in:
            if key not in known:
                raise BadParameter(self._unknown(key, f"tensor {name}"))
        per_donor = []
        for index, params in enumerate(params_in):
            where = f"{name} donor #{index}"
            for key in params:
                if key not in known:
                    raise BadParameter(self._unknown(key, where))
            mine = {
                spec.name: self._bind_one(spec, params, options_in, where)
                for spec in self.params
                if spec.scope == "per_model"
            }
            if self.check is not None:
                self.check(options, mine, f"{self.name} {where}")
            per_donor.append(mine)
        return Bound(options=options, per_donor=per_donor)

    def _bind_one(
        self,
        spec: ParamSpec,
        primary: Mapping[str, object],
        fallback: Mapping[str, object],
        where: str,
    ) -> Scalar | None:
        if spec.name in primary:
            raw = primary[spec.name]
        elif spec.name in fallback:
            raw = fallback[spec.name]
        elif spec.required:
            raise BadParameter(f"{self.name} {where}: parameter {spec.name!r} is required")
        else:
            raw = spec.default
        if raw is None:
            if spec.default is None:
                return None
            raise BadParameter(f"{self.name} {where}: parameter {spec.name!r} has no value")
        return spec.coerce(raw, f"{self.name} {where}")

    def merge(self, job: TensorJob) -> torch.Tensor:
        """Merge one tensor: the float64 result rounded once to ``job.out_dtype``.

        Raises:
            RecipeError: a base is missing where the method needs one.
            BadParameter: a parameter is missing, of the wrong type or out of range.
            ShapeMismatch: the inputs' shapes differ.
        """
        self._check_job(job)
        bound = self.bind(job)
        first = job.donors[0] if job.donors else job.base
        if first is not None and first.numel() == 0:
            return torch.empty(first.shape, dtype=job.out_dtype)  # nothing to merge
        if not self.streaming:
            job = replace(job, base=_widen(job.base), donors=tuple(_widen(x) for x in job.donors))
        out = self.kernel(job, bound)
        out = out if out.dtype == job.out_dtype else round_to(out, job.out_dtype)
        if job.out is None or out.data_ptr() == job.out.data_ptr():
            return out
        job.out.copy_(out.reshape(-1))
        return job.out

    def merge_raw(self, name: str, options: Mapping[str, object],
                  params: Sequence[Mapping[str, object]], base: Raw | None,
                  donors: Sequence[Raw], out: Raw) -> None:
        """:meth:`merge` of an elementwise method on numpy arrays of stored bits (a
        tensor, or any range of it): fills ``out``. ``base`` is None for a method that
        ignores it.

        Raises:
            RecipeError, BadParameter, ShapeMismatch: as :meth:`merge`.
            TypeError: the method has no raw kernel, or an array is not of its dtype.
        """
        if self.raw_kernel is None:
            raise TypeError(f"{self.name} is not elementwise: it has no raw kernel")
        self._check_inputs(name, base is not None, len(donors), len(params))
        arrays = [*donors, out] if base is None else [base, *donors, out]
        for a in arrays:
            if RAW_DTYPES.get(a.dtype) != a.values.dtype or a.values.ndim != 1:
                raise TypeError(f"{name}: not a flat array of {a.dtype} bits: {a.values.dtype}")
        if len({a.values.size for a in arrays}) > 1:
            raise ShapeMismatch(f"tensor {name} has different sizes across inputs: "
                                f"{sorted({a.values.size for a in arrays})}")
        _named(name, self.raw_kernel, self.bind_values(name, options, params), base, donors, out)

    def _check_inputs(self, name: str, has_base: bool, donors: int, params: int) -> None:
        """The checks :meth:`merge` and :meth:`merge_raw` share: a base where one is
        required, a donor count this method takes, one parameter map per donor."""
        if self.base == "required" and not has_base:
            raise RecipeError(
                f"{self.name} needs a base model, and tensor {name} has none; "
                "name a base_model in the recipe"
            )
        self._check_count(donors)
        if params != donors:
            raise ValueError(f"{name}: {params} per-donor parameter maps for {donors} donors")

    def _check_job(self, job: TensorJob) -> None:
        self._check_inputs(job.name, job.base is not None, len(job.donors), len(job.params))
        tensors = list(job.donors)
        if job.base is not None and self.base != "ignored":
            tensors.insert(0, job.base)
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dtype not in float_dtypes():
                raise TypeError(f"{job.name}: methods take float tensors, got {_dtype(t)}")
        if job.out_dtype not in float_dtypes():
            raise TypeError(f"{job.name}: the output dtype must be a float, got {job.out_dtype}")
        if job.out is not None and (job.out.dtype != job.out_dtype or job.out.dim() != 1
                                    or not job.out.is_contiguous()
                                    or job.out.numel() != tensors[0].numel()):
            raise ValueError(f"{job.name}: out must be a flat contiguous {job.out_dtype} "
                             f"tensor of {tensors[0].numel()} elements")
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ShapeMismatch(
                f"tensor {job.name} has different shapes across inputs: "
                f"{sorted(shapes)}; align the models first"
            )
        if self.random:
            if len(job.keys) != len(job.donors) or any(
                not isinstance(k, bytes) or len(k) != 32 for k in job.keys
            ):
                raise ValueError(
                    f"{job.name}: {self.name} draws random masks and needs one 32-byte key "
                    f"per donor ({len(job.donors)}), got {len(job.keys)}"
                )


def float_dtypes() -> tuple[torch.dtype, ...]:
    """Input and output dtypes: every value of each is exactly a float64."""
    return (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _widen(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float64 else t.to(torch.float64)


def _dtype(t: object) -> str:
    return str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


# -- the registry -----------------------------------------------------------------------------

METHODS: dict[str, Method] = {}
"""Every registered method, keyed by the exact name users write (mergekit's names)."""


WHOLE_MODEL: dict[str, Method] = {}
"""Methods resolve runs over the whole model rather than tensor by tensor (``cross_family``):
known to :func:`get_method` for recipe validation, absent from :data:`METHODS`."""


def register(method: Method, *, per_tensor: bool = True) -> Method:
    """Add ``method`` to :data:`METHODS` (or :data:`WHOLE_MODEL`); a second method of the
    same name is a bug."""
    if method.name in METHODS or method.name in WHOLE_MODEL:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    (METHODS if per_tensor else WHOLE_MODEL)[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method registered under ``name``.

    Raises:
        UnknownMethod: no such method; the message lists the known names.
    """
    try:
        return METHODS[name] if name in METHODS else WHOLE_MODEL[name]
    except KeyError:
        known = ", ".join(sorted(METHODS) + sorted(WHOLE_MODEL))
        raise UnknownMethod(f"unknown merge method {name!r}; known methods: {known}") from None
