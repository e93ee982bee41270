"""Gradient cooperation between the reconstruction and the regularisation gradient (METHOD.md 2 and 4.2).

``g_r`` is the reconstruction gradient, ``g_v`` the (already weighted) regularisation gradient.

- ``feature`` mode: :class:`FeatureGate` hooks each quantized layer's input ``X_i``; during the single backward
  pass it replaces the total gradient ``g_r`` at ``X_i`` by ``sign_gate(g_r, g_v)`` with ``g_v`` in closed form.
- ``param`` mode: two backward passes give per-parameter ``g_r`` and ``g_v``; :func:`gate_param_grads`.
- ``cosine`` mode (version 2): :func:`cosine_combine`.
- ``naive`` mode: ``g_r + g_v`` (plain sum of the two losses); ``off``: no regularisation at all.

Under distributed training, average ``g_r`` and ``g_v`` with :func:`all_reduce_mean_` before ``param`` or
``cosine`` combine them, so that every rank takes the same decision.

Plain PyTorch: nothing in ``odm_basicsr.odm`` imports BasicSR.
"""
import torch
import torch.distributed as dist

#: The cooperation modes, in documentation order; ``train.cooperation`` is checked against them by the option schema
#: (:data:`odm_basicsr.option_schema.ODM_TRAIN`).
COOPERATION_MODES = ('feature', 'param', 'cosine', 'naive', 'off')


def _gate_counts(g_r, g_v):
    """``sign_gate`` plus the raw counts (agreeing elements, elements with ``g_v != 0``) as 0-d int64 tensors."""
    if g_r.shape != g_v.shape:
        raise ValueError(f'g_r shape {tuple(g_r.shape)} and g_v shape {tuple(g_v.shape)} differ')
    combined, agree = _gate(g_r, g_v)
    return combined, agree.sum(), (g_v != 0).sum()


def _gate(g_r, g_v):
    """``(g_r + g_v * [agree], agree)``; both signs agree exactly where the product is positive.

    The product is taken in at least float32 so that tiny half-precision gradients do not underflow to 0.
    """
    g_v = g_v.to(g_r.dtype)
    wide = torch.promote_types(g_r.dtype, torch.float32)
    agree = (g_r.to(wide) * g_v.to(wide)) > 0
    return g_r.addcmul(g_v, agree.to(g_r.dtype)), agree


def _fraction(n_agree, n_active):
    """``n_agree / n_active`` as a 0-d float32 tensor, 0 when ``n_active`` is 0 (no host sync)."""
    return n_agree.to(torch.float32) / n_active.clamp_min(1).to(torch.float32)


def sign_gate(g_r, g_v):
    """Add ``g_v`` to ``g_r`` only where both have the same sign, element by element.

    ``combined = g_r + g_v * [sign(g_v) == sign(g_r)]``. Where ``g_r == 0`` and ``g_v != 0`` the signs differ,
    so ``g_v`` is dropped there.

    The agree fraction (the logged "cooperation ratio") counts only elements where ``g_v != 0``: where the
    regulariser has no gradient there is nothing to accept or reject, and counting those elements would make the
    ratio depend on how sparse ``g_v`` is (e.g. dead ReLU outputs). It is 0 when ``g_v`` is zero everywhere.

    Args:
        g_r (Tensor): Reconstruction gradient, any shape.
        g_v (Tensor): Regularisation gradient, same shape; cast to ``g_r``'s dtype.

    Returns:
        tuple[Tensor, Tensor]: ``combined`` (shape and dtype of ``g_r``) and ``agree_fraction`` (0-d float32 in
        [0, 1], on ``g_r``'s device).
    """
    combined, n_agree, n_active = _gate_counts(g_r, g_v)
    return combined, _fraction(n_agree, n_active)


def gate_param_grads(grads_r, grads_v):
    """:func:`sign_gate` for every parameter (``param`` mode).

    Args:
        grads_r (list[Tensor | None]): Reconstruction gradient per parameter; None is treated as zeros.
        grads_v (list[Tensor | None]): Regularisation gradient per parameter; None keeps ``g_r`` unchanged.

    Returns:
        tuple[list[Tensor | None], Tensor]: The combined gradients (None only where both inputs are None; zeros
        where only ``g_r`` is None, because ``g_v`` never agrees in sign with a zero gradient) and the agree
        fraction over all parameters, weighted by element count (elements with ``g_v != 0`` only; 0-d float32).
    """
    if len(grads_r) != len(grads_v):
        raise ValueError(f'got {len(grads_r)} reconstruction gradients but {len(grads_v)} regularisation gradients')
    combined = []
    n_agree = n_active = None
    for g_r, g_v in zip(grads_r, grads_v):
        if g_v is None:
            combined.append(g_r)
            continue
        if g_r is None:
            g_r = torch.zeros_like(g_v)
        c, a, n = _gate_counts(g_r, g_v)
        combined.append(c)
        n_agree = a if n_agree is None else n_agree + a.to(n_agree.device)
        n_active = n if n_active is None else n_active + n.to(n_active.device)
    if n_agree is None:
        return combined, torch.zeros((), dtype=torch.float32)
    return combined, _fraction(n_agree, n_active)


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def cosine_combine(grads_r, grads_v):
    """Version-2 cooperation: ``grad = g_r + w * g_v`` with ``w = (cos(g_r, g_v) + 1) / 2`` (``cosine`` mode).

    One cosine over all parameters' gradients concatenated; None entries count as zeros. The dot product and
    norms are accumulated in at least float32. A zero ``g_r`` or ``g_v`` gives ``cos = 0`` (``w = 0.5``).

    Args:
        grads_r (list[Tensor | None]): Reconstruction gradient per parameter.
        grads_v (list[Tensor | None]): Regularisation gradient per parameter, same shapes.

    Returns:
        tuple[list[Tensor | None], Tensor, Tensor]: The combined gradients (``g_r`` where ``g_v`` is None,
        ``w * g_v`` where ``g_r`` is None, None where both are), ``weight`` and ``cosine`` (0-d tensors).
    """
    if len(grads_r) != len(grads_v):
        raise ValueError(f'got {len(grads_r)} reconstruction gradients but {len(grads_v)} regularisation gradients')
    dot = sq_r = sq_v = None

    def acc(total, value):
        return value if total is None else total + value.to(total.device, total.dtype)

    for g_r, g_v in zip(grads_r, grads_v):
        if g_r is not None and g_v is not None and g_r.shape != g_v.shape:
            raise ValueError(f'g_r shape {tuple(g_r.shape)} and g_v shape {tuple(g_v.shape)} differ')
        if g_r is not None:
            r = g_r.detach().to(_acc_dtype(g_r.dtype))
            sq_r = acc(sq_r, r.square().sum())
        if g_v is not None:
            v = g_v.detach().to(_acc_dtype(g_v.dtype))
            sq_v = acc(sq_v, v.square().sum())
            if g_r is not None:
                dot = acc(dot, (r * v.to(r.dtype)).sum())
    if dot is None:  # no parameter has both gradients: the vectors are orthogonal (or one is empty)
        ref = next((g for g in list(grads_r) + list(grads_v) if g is not None), None)
        device = ref.device if ref is not None else None
        dtype = _acc_dtype(ref.dtype) if ref is not None else torch.float32
        cosine = torch.zeros((), device=device, dtype=dtype)
    else:
        denom = sq_r.sqrt() * sq_v.to(sq_r.device, sq_r.dtype).sqrt()
        cosine = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(dot))
        cosine = cosine.clamp(-1.0, 1.0)
    weight = (cosine + 1) / 2
    combined = []
    for g_r, g_v in zip(grads_r, grads_v):
        if g_v is None:
            combined.append(g_r)
        elif g_r is None:
            combined.append(g_v * weight.to(g_v.device, g_v.dtype))
        else:
            combined.append(g_r + g_v.to(g_r.dtype) * weight.to(g_r.device, g_r.dtype))
    return combined, weight, cosine


def gate_stats(g_r, g_v):
    """The counts behind the logged ``coop`` and ``agree`` of one sign-gated gradient, without a host sync.

    Returns:
        Tensor: float32, shape (4,): ``[sum |g_v| applied, sum |g_v|, elements agreeing, elements with g_v != 0]``.
        :func:`coop_agree` turns sums of these (over layers) into the two ratios.
    """
    wide = torch.promote_types(g_r.dtype, torch.float32)
    agree = (g_r.to(wide) * g_v.to(wide)) > 0
    a = g_v.to(wide).abs()
    return torch.stack([(a * agree).sum(), a.sum(), agree.sum().to(wide), (g_v != 0).sum().to(wide)]).float()


def coop_agree(stats):
    """``(coop, agree)`` from :func:`gate_stats` counts (or their sum over layers).

    ``coop`` is the share of the regulariser's gradient that is applied, in L1 norm (the strength the gate lets
    through: a ``naive`` run at ``coop * lambda`` applies as much regulariser gradient in total); ``agree`` the
    fraction of elements with a regulariser gradient whose sign agrees with the reconstruction gradient. Both are
    0 when the regulariser gradient is zero everywhere.
    """
    return stats[0] / stats[1].clamp_min(1e-30), stats[2] / stats[3].clamp_min(1)


class FeatureGate:
    """``feature``-mode cooperation for one forward/backward pass (METHOD.md 4.2).

    :meth:`add` marks a quantized layer's input ``X_i``; in the backward pass a gradient hook on ``X_i`` itself
    receives the **total** reconstruction gradient at ``X_i`` (summed over every consumer: the quantized layer, a
    skip connection, a concat) and replaces it by ``g_r + g_v * [sign(g_v) == sign(g_r)]`` (or ``g_r + g_v`` with
    ``gate=False``) before it flows on to the layers that produced ``X_i``. A tensor that feeds several quantized
    layers gets one hook, with the sum of their ``g_v``.

    Args:
        gate (bool): Apply the sign gate (True) or add ``g_v`` unconditionally (False). Default: True.

    Attributes:
        enabled (bool): False passes gradients through unchanged (e.g. during a reconstruction-only pass).
        stats (dict[str, list[Tensor]]): Per marked name, the :func:`gate_stats` of each backward pass, if
            ``record`` was set in :meth:`add`.
    """

    def __init__(self, gate=True):
        self.gate = gate
        self.enabled = True
        self.stats = {}
        self._marked = {}

    def add(self, x, grad_fn, name='', record=False):
        """Mark ``x`` (a layer's input) with ``grad_fn(x) -> g_v`` (closed form, weighted, under no_grad)."""
        if not x.requires_grad:
            return x
        entry = self._marked.get(id(x))
        if entry is None:
            # the hook holds a detached alias only: a hook holding x itself would form a cycle through autograd
            payload = {'x': x.detach(), 'grad_fns': [], 'names': []}
            self._marked[id(x)] = (x, payload)
            x.register_hook(lambda g_r, payload=payload: self._hook(g_r, payload))
        else:
            payload = entry[1]
        payload['grad_fns'].append(grad_fn)
        payload['names'].append(name if record else None)
        return x

    def _hook(self, g_r, payload):
        if not self.enabled:
            return None
        with torch.no_grad():
            g_v = None
            for fn in payload['grad_fns']:
                v = fn(payload['x'])
                g_v = v if g_v is None else g_v + v
            if g_v.shape != g_r.shape:
                raise ValueError(f'g_r shape {tuple(g_r.shape)} and g_v shape {tuple(g_v.shape)} differ')
            names = [n for n in payload['names'] if n is not None]
            if names:  # counting costs a little: only on the steps that are logged
                st = gate_stats(g_r, g_v)
                if not self.gate:
                    st = torch.stack([st[1], st[1], st[2], st[3]])
                for n in names:
                    self.stats.setdefault(n, []).append(st)
            return _gate(g_r, g_v)[0] if self.gate else g_r + g_v.to(g_r.dtype)

    def reset(self):
        """Forget the marked tensors (call after each backward pass); ``stats`` are kept."""
        self._marked = {}


def cooperative_feature(x, grad_fn, record=None, gate=True):
    """Mark one feature for ``feature``-mode cooperation (a one-feature :class:`FeatureGate`).

    Returns ``x`` itself. In the backward pass the total gradient ``g_r`` that reaches ``x`` is replaced by
    ``sign_gate(g_r, grad_fn(x))[0]`` (``g_r + grad_fn(x)`` with ``gate=False``) before it flows on.

    Args:
        x (Tensor): The feature ``X_i``, any shape, device and dtype. Nothing happens if it needs no gradient.
        grad_fn (callable): ``grad_fn(x) -> Tensor`` of ``x``'s shape: the closed-form, weighted regulariser
            gradient, e.g. ``FeatureVarianceLoss.feature_grad``. Called under ``torch.no_grad()``.
        record (list | None): If given, the backward pass appends the :func:`gate_stats` of this feature.
            Default: None.
        gate (bool): True (default) applies the sign gate; False adds ``g_v`` unconditionally.

    Returns:
        Tensor: ``x``.
    """
    fg = FeatureGate(gate)
    if record is not None:
        fg.stats[''] = record
    out = fg.add(x, grad_fn, '', record is not None)
    fg.reset()  # the hook refers to the gate: the gate must not keep x, or x -> graph -> hook -> gate -> x is a cycle
    return out


def all_reduce_mean_(tensors):
    """Average tensors across ranks in place, so that every rank sees the same gradients.

    A no-op unless ``torch.distributed`` is initialised with a world size > 1. None entries are skipped.
    Tensors are flattened into one buffer per (device, dtype) so that each group costs one collective.

    Args:
        tensors (list[Tensor | None]): Modified in place.

    Returns:
        list[Tensor | None]: ``tensors``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensors
    world_size = dist.get_world_size()
    if world_size <= 1:
        return tensors
    groups = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        offset = 0
        for t in group:
            n = t.numel()
            with torch.no_grad():
                t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return tensors
