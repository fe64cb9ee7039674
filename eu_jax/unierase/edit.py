"""UniErase stage 2: AlphaEdit-style closed-form edits of `mlp.down_proj` that make prompts emit a target.

For a round of requests (all at once, or a few at a time for sequential editing):
1. Target residuals z*: at the last edit layer L, an offset delta of the residual stream at each request's
   subject token is optimised (Adam) so the model predicts the target after the prompt under every
   context prefix, with a KL term keeping the subject's ordinary next-token distribution in a raw
   "essence" prompt, a weight decay, and a norm clamp (MEMIT's compute_z).
2. For each edit layer l in order: keys K (down_proj inputs at the subject token, averaged over contexts)
   and the residual still missing at L, spread over the layers left: R = (z* - z) / (layers left). The
   update of the [mlp, embed] kernel is
       Delta = (P (K^T K + C) + lam I)^-1 P K^T R
   with P the projector onto the null space of retained keys (so retained keys' outputs do not move),
   and C the accumulated K^T K of earlier rounds (so earlier edits are not undone).
3. C += K^T K of this round (keys recomputed with the edited weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from eu_jax.models.config import ModelConfig
from eu_jax.models.state import Params, build_decoder
from eu_jax.parallel.sharding import BATCH_AXES, activation_sharding, batch_sharding, to_global, to_host
from eu_jax.unierase.requests import EditBatch, EditEncoder, EditRequest, check_kl_template
from eu_jax.unierase.tracing import add_at_positions, at_positions, final_logits, run_layers


def get_edit_config() -> ConfigDict:
    """Defaults follow AlphaEdit's Llama-3 settings, with the layer band (per edit position) scaled to the model's depth."""
    return ConfigDict(
        {
            "layers": "",  # comma-separated layer indices; "" = default_edit_layers(depth, position)
            "requests_per_round": 0,  # 0: one batch edit of all requests; k: sequential rounds of k
            "l2": 10.0,  # lam: ridge term of the closed form
            "nullspace_energy": 1e-2,  # the null space may hold at most this share of retained keys' energy
            "contexts": {"count": 5, "length": 10, "seed": 0},  # self-sampled context prefixes (plus the plain prompt)
            "kl_template": "{} is a",  # the essence prompt whose next-token distribution is kept
            # Where the edit acts: "prompt_end", the last prompt token, where the reply's first token (UniErase's
            # target) is predicted; or "subject", the last token of the request's subject (MEMIT's choice for facts).
            # The default layer band depends on it (LAYER_BANDS).
            "position": "prompt_end",
            "target": {
                "steps": 50,  # MEMIT uses 20-25 with a word target; a brand-new token needs more
                "learning_rate": 0.5,
                "kl_factor": 0.0625,
                "weight_decay": 1e-3,
                "clamp_norm_factor": 4.0,  # |delta| <= factor * |z|
                "stop_nll": 0.05,  # a request stops moving once its target NLL is below this
            },
        }
    )


# Layer bands as fractions of the depth, [first, last] (both rounded, never the last layer).
# "subject": AlphaEdit's layers 4-8 of 32-layer Llama-3, where MLPs recall facts at the subject's last token.
# "prompt_end": layers 22-26 of 30. The last prompt token (the chat template's "assistant\n") holds what the
# question asks only after attention has gathered it. On SmolLM2-135M (the TOFU-style benchmark's target) its
# keys in layers 4-8 carried nothing that told the forget author's questions from the retain authors' (the
# forget mean sat at 5% of the retain keys' variance; 99.9% of the forget keys' energy lay in the span of 90
# retain keys), so that edit took the token's NLL only from 26 to 10, and held-out retain questions' with
# it; at 22-26 the two differ (forget mean 15-44% of the variance) and the edit reached NLL 0.2 with the
# held-out retain questions' staying at 27 (at 18-22: 3.5 and 12.6).
LAYER_BANDS = {"subject": (4 / 32, 8 / 32), "prompt_end": (22 / 30, 26 / 30)}


def default_edit_layers(num_layers: int, position: str = "subject") -> list[int]:
    """The band of `position` (LAYER_BANDS) scaled to `num_layers`; at least one layer, never the last."""
    if position not in LAYER_BANDS:
        raise ValueError(f"edit position {position!r}: use one of {sorted(LAYER_BANDS)}")
    first, last = LAYER_BANDS[position]
    last_allowed = max(num_layers - 2, 0)
    start = min(int(num_layers * first + 0.5), last_allowed)
    stop = min(max(int(num_layers * last + 0.5), start), last_allowed)
    return list(range(start, stop + 1))


def parse_layers(text: str, num_layers: int, position: str = "subject") -> list[int]:
    """Comma-separated layer indices, or the default band of `position` for "" (a message starts with `layers=`)."""
    if not text.strip():
        return default_edit_layers(num_layers, position)
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"layers={text!r} is not a comma-separated list of layer indices") from None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers={text!r}: each must be in [0, {num_layers - 1}] for this {num_layers}-layer model")
    return layers


def check_edit_config(cfg: ConfigDict, num_layers: int) -> list[int]:
    """The edit layers, after checking the settings that would otherwise edit nothing without a word (no round,
    an empty null space), make the solve singular, or fail only once stage 1 has trained the token. Each
    message starts with its key (`l2=...`), for the caller to prefix with the config's section."""
    if cfg.position not in LAYER_BANDS:
        raise ValueError(f"position={cfg.position!r} is not one of {sorted(LAYER_BANDS)}")
    if cfg.requests_per_round < 0:
        raise ValueError(f"requests_per_round={cfg.requests_per_round} must be >= 0 (0: all requests in one round)")
    if not cfg.l2 > 0:
        raise ValueError(f"l2={cfg.l2} must be > 0: without the ridge term the closed-form solve can be singular")
    if not 0 <= cfg.nullspace_energy < 1:
        raise ValueError(f"nullspace_energy={cfg.nullspace_energy} must be in [0, 1): the share of the retained keys' "
                         "energy an edit may reach (below 0 the null space is empty, at 1 it is every direction)")
    if cfg.contexts.count > 0 and cfg.contexts.length < 1:
        raise ValueError(f"contexts.length={cfg.contexts.length} must be >= 1: the tokens of each sampled context prefix")
    check_kl_template(cfg.kl_template)
    return parse_layers(cfg.layers, num_layers, cfg.position)


@dataclass
class EditState:
    """What sequential editing carries between rounds: per edit layer, the sum of K^T K of earlier edits."""

    layers: list[int]
    previous: np.ndarray  # [len(layers), F, F]
    rounds: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def empty(cls, layers: Sequence[int], intermediate_size: int) -> "EditState":
        return cls(list(layers), np.zeros((len(layers), intermediate_size, intermediate_size), np.float32))


def _pad_rows(batch: EditBatch, multiple: int) -> EditBatch:
    """Extra copies of row 0 (owned by no request, scoring nothing) so the mesh's batch axes divide the rows."""
    extra = -len(batch.ids) % multiple
    if not extra:
        return batch

    def pad(a: np.ndarray, fill=None) -> np.ndarray:
        rows = np.repeat(a[:1], extra, axis=0) if fill is None else np.full((extra,) + a.shape[1:], fill, a.dtype)
        return np.concatenate([a, rows])

    return EditBatch(
        ids=pad(batch.ids), attention=pad(batch.attention), lookup=pad(batch.lookup), request=pad(batch.request, batch.num_requests),
        targets=pad(batch.targets), target_positions=pad(batch.target_positions), target_mask=pad(batch.target_mask, 0),
        essence=pad(batch.essence, 0), last=pad(batch.last), num_requests=batch.num_requests, num_contexts=batch.num_contexts,
    )


def _request_mean(values: jax.Array, request: jax.Array, weights: jax.Array, num_requests: int) -> jax.Array:
    """Weighted mean of per-row values over each request's rows ([N] -> [R]); rows of request R are padding."""
    total = jax.ops.segment_sum(values * weights, request, num_segments=num_requests)
    return total / jnp.maximum(jax.ops.segment_sum(weights, request, num_segments=num_requests), 1e-9)


@lru_cache(maxsize=8)
def _target_optimiser(config: ModelConfig, first_layer: int, z_layer: int, num_requests: int, learning_rate: float,
                      kl_factor: float, weight_decay: float, clamp: float, stop_nll: float):
    """jit(params, plain rows, steps, residual before `first_layer`, batch arrays) -> (z* [R, D], z [R, D],
    target NLL per request at z*).

    `steps` is traced, so the NLL without optimising (0 steps) runs the same compiled program."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def optimise(params, plain_rows, steps, below, ids, attention, lookup, request, targets, target_positions,
                 target_mask, essence, last):
        model = build_decoder(config, params)
        inputs = model.prepare(ids, attention)
        h = jax.lax.stop_gradient(run_layers(model, inputs, below, first_layer, z_layer + 1)[0])
        z = at_positions(h, lookup)[plain_rows]  # each request's residual in its plain prompt
        owner = jnp.clip(request, 0, num_requests - 1)
        rewrite_rows = ((essence == 0) & (request < num_requests)).astype(jnp.float32)
        essence_rows = (essence == 1).astype(jnp.float32)

        def log_probs(delta):
            x, _ = run_layers(model, inputs, add_at_positions(h, lookup, delta[owner]), z_layer + 1, config.num_layers)
            picked = jnp.take_along_axis(x, target_positions[..., None], axis=1)  # [N, M, D]
            target_lp = jax.nn.log_softmax(final_logits(model, picked).astype(jnp.float32))
            target_lp = jnp.take_along_axis(target_lp, targets[..., None], axis=-1)[..., 0]
            return target_lp, jax.nn.log_softmax(final_logits(model, at_positions(x, last)).astype(jnp.float32))

        essence_before = jax.lax.stop_gradient(log_probs(jnp.zeros_like(z))[1])
        z_norm2 = jnp.sum(z * z, axis=-1)
        max_norm = clamp * jnp.sqrt(z_norm2)[:, None]

        def loss(delta):
            target_lp, last_lp = log_probs(delta)
            row_nll = -(target_lp * target_mask).sum(1) / jnp.maximum(target_mask.sum(1), 1)
            nll = _request_mean(row_nll, request, rewrite_rows, num_requests)
            row_kl = jnp.sum(jnp.exp(last_lp) * (last_lp - essence_before), axis=-1)
            kl = _request_mean(row_kl, request, essence_rows, num_requests)
            decay = jnp.sum(delta * delta, axis=-1) / jnp.maximum(z_norm2, 1e-12)
            return jnp.sum(nll + kl_factor * kl + weight_decay * decay), nll

        def step(_, carry):
            delta, opt_state = carry
            (_, nll), grads = jax.value_and_grad(loss, has_aux=True)(delta)
            updates, new_state = optimizer.update(grads, opt_state, delta)
            moved = optax.apply_updates(delta, updates)
            moved = moved * jnp.minimum(1.0, max_norm / jnp.maximum(jnp.linalg.norm(moved, axis=-1, keepdims=True), 1e-12))
            active = (nll > stop_nll)[:, None]  # a request that already predicts its target stays put
            keep = lambda new, old: jnp.where(active, new, old) if new.shape == delta.shape else new  # noqa: E731
            return jnp.where(active, moved, delta), jax.tree.map(keep, new_state, opt_state)

        delta = jnp.zeros_like(z)
        delta, _ = jax.lax.fori_loop(0, steps, step, (delta, optimizer.init(delta)))
        return z + delta, z, loss(delta)[1]

    return optimise


@lru_cache(maxsize=16)
def _residual_before(config: ModelConfig, layer: int):
    """jit(params, ids, attention) -> the residual stream entering `layer` [N, T, D].

    Edits change only the edited layers' `down_proj`, so what enters the first of them is the same for
    every pass of an edit round: computed once, and the passes run from there."""

    @jax.jit
    def fn(params, ids, attention):
        model = build_decoder(config, params)
        inputs = model.prepare(ids, attention)
        return run_layers(model, inputs, inputs.x, 0, layer)[0]

    return fn


@lru_cache(maxsize=16)
def _keys_and_residual(config: ModelConfig, key_layers: tuple[int, ...], z_layer: int):
    """jit(params, residual before the first of `key_layers`, ids, attention, lookup) -> (keys of each of
    `key_layers` [L, N, F], residual after `z_layer` [N, D]) at lookup: one program for every layer of an
    edit (the forward runs to `z_layer` either way)."""

    @jax.jit
    def fn(params, below, ids, attention, lookup):
        model = build_decoder(config, params)
        inputs = model.prepare(ids, attention)
        x, keys = run_layers(model, inputs, below, min(key_layers), max(*key_layers, z_layer) + 1, key_layers)
        picked = jnp.stack([at_positions(keys[layer], lookup) for layer in key_layers])
        return picked.astype(jnp.float32), at_positions(x, lookup).astype(jnp.float32)

    return fn


@jax.jit
def _closed_form(projector: jax.Array, keys: jax.Array, previous: jax.Array, residual: jax.Array, l2: float) -> jax.Array:
    """Delta [F, D] = (P (K^T K + C) + l2 I)^-1 P K^T R; it lies in P's range, so P-orthogonal keys see no change."""
    lhs = projector @ (keys.T @ keys + previous) + l2 * jnp.eye(keys.shape[1], dtype=keys.dtype)
    return jnp.linalg.solve(lhs, projector @ (keys.T @ residual))


def _add_to_layer(params: Params, layer: int, update: jax.Array) -> Params:
    down = params["layers"]["mlp"]["down_proj"]
    new_down = jax.jit(lambda k, u: k.at[layer].add(u.astype(k.dtype)), out_shardings=down.sharding)(down, update)
    return {**params, "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"], "down_proj": new_down}}}


class Editor:
    """Applies rounds of edit requests to params held on a mesh, carrying the sequential-editing state."""

    def __init__(self, config: ModelConfig, params: Params, tokenizer: Any, mesh: Mesh, edit_config: ConfigDict,
                 projectors: np.ndarray, state: EditState, prefixes: Sequence[str] = ("",)):
        self.config, self.params, self.mesh, self.cfg = config, params, mesh, edit_config
        self.encoder = EditEncoder(tokenizer, position=edit_config.position)
        self.projectors = jnp.asarray(projectors)
        self.state = state
        self.prefixes = list(prefixes)
        self.shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))

    @property
    def layers(self) -> list[int]:
        return self.state.layers

    def _device_batch(self, batch: EditBatch) -> tuple[jax.Array, ...]:
        """The residual entering the first edited layer, then the batch's arrays, on the mesh."""
        padded, sharding = _pad_rows(batch, self.shards), batch_sharding(self.mesh)
        names = ("ids", "attention", "lookup", "request", "targets", "target_positions", "target_mask", "essence", "last")
        arrays = tuple(to_global(getattr(padded, name), sharding) for name in names)
        with activation_sharding(self.mesh):
            below = _residual_before(self.config, min(self.layers))(self.params, *arrays[:2])
        return (below,) + arrays

    def _targets(self, batch: EditBatch, arrays: tuple[jax.Array, ...], steps: int | None = None) -> tuple[np.ndarray, ...]:
        t = self.cfg.target
        fn = _target_optimiser(self.config, min(self.layers), self.layers[-1], batch.num_requests, t.learning_rate,
                               t.kl_factor, t.weight_decay, t.clamp_norm_factor, t.stop_nll)
        plain = jax.device_put(np.arange(batch.num_requests, dtype=np.int32) * batch.num_contexts, NamedSharding(self.mesh, PartitionSpec()))
        with activation_sharding(self.mesh):
            return tuple(to_host(x) for x in fn(self.params, plain, t.steps if steps is None else steps, *arrays))

    def _request_keys(self, batch: EditBatch, arrays: tuple[jax.Array, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Keys of every edited layer averaged over each request's contexts [L, R, F], and the current z of its
        plain prompt [R, D]."""
        fn = _keys_and_residual(self.config, tuple(self.layers), self.layers[-1])
        with activation_sharding(self.mesh):
            keys, z = (to_host(x) for x in fn(self.params, *arrays[:4]))
        r, c = batch.num_requests, batch.num_contexts
        return keys[:, : r * c].reshape(len(self.layers), r, c, -1).mean(axis=2), z[: r * c : c]

    def target_nll(self, requests: Sequence[EditRequest]) -> np.ndarray:
        """Each request's NLL of its target (averaged over the context prefixes) under the current params."""
        batch = self.encoder.encode(requests, self.prefixes, self.cfg.kl_template)
        return self._targets(batch, self._device_batch(batch), steps=0)[2]

    def edit_round(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        """One batch edit of `requests`; returns what it did (target NLL before / at z* / after, update norms)."""
        batch = self.encoder.encode(requests, self.prefixes, self.cfg.kl_template)
        arrays = self._device_batch(batch)
        z_star, z_start, nll_at_target = self._targets(batch, arrays)
        nll_before = self._targets(batch, arrays, steps=0)[2]
        norms = []
        for i, layer in enumerate(self.layers):  # each layer's keys and z as the edits of the layers before left them
            keys, z = self._request_keys(batch, arrays)
            residual = (z_star - z) / (len(self.layers) - i)
            update = _closed_form(self.projectors[i], jnp.asarray(keys[i]), jnp.asarray(self.state.previous[i]),
                                  jnp.asarray(residual), float(self.cfg.l2))
            self.params = _add_to_layer(self.params, layer, update)
            norms.append(float(jnp.linalg.norm(update)))
        keys, _ = self._request_keys(batch, arrays)
        for i, layer_keys in enumerate(keys):
            self.state.previous[i] += (layer_keys.T @ layer_keys).astype(np.float32)
        self.state.rounds += 1
        record = {
            "round": self.state.rounds, "requests": len(requests),
            "target_nll_before": nll_before.tolist(), "target_nll_at_z_star": nll_at_target.tolist(),
            "target_nll_after": self._targets(batch, arrays, steps=0)[2].tolist(),
            "z_shift_norm": np.linalg.norm(z_star - z_start, axis=-1).tolist(), "update_norms": norms,
        }
        self.state.log.append(record)
        return record

    def edit(self, requests: Sequence[EditRequest], on_round: Callable[[dict[str, Any]], None] | None = None) -> Params:
        """All requests, in rounds of `requests_per_round` (0: one round), in order; `on_round` sees each round's record."""
        size = self.cfg.requests_per_round or len(requests)
        for start in range(0, len(requests), size):
            record = self.edit_round(requests[start : start + size])
            if on_round is not None:
                on_round(record)
        return self.params


def sample_context_prefixes(model, tokenizer: Any, mesh: Mesh, count: int, length: int, seed: int) -> list[str]:
    """The plain prompt ("") plus `count` short texts the model writes itself (MEMIT's context templates:
    top-5 sampling of `length` tokens after a few common openings), each ending in ". "."""
    if count <= 0:
        return [""]
    from eu_jax.generate import SamplingConfig, generate

    openings = ["The", "Therefore", "Because", "I", "You"]
    starts = [openings[i % len(openings)] for i in range(count)]
    prompts = [list(tokenizer(text)["input_ids"]) for text in starts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampling = SamplingConfig(max_new_tokens=length, temperature=1.0, top_k=5, seed=seed)
    result = generate(model, prompts, sampling, (), pad_id=pad, mesh=mesh)
    texts = [tokenizer.decode(prompt + completion.content, skip_special_tokens=True) for prompt, completion in zip(prompts, result.completions)]
    return [""] + [" ".join(text.replace("{", " ").replace("}", " ").split()) + ". " for text in texts]


EDIT_STATE_FILE = "unierase_edits.npz"


def save_edit_state(state: EditState, directory: Path) -> Path:
    """Write the sequential-editing state next to an edited checkpoint, so a later run continues it."""
    path = Path(directory) / EDIT_STATE_FILE
    np.savez(path, layers=np.asarray(state.layers), previous=state.previous, rounds=np.asarray(state.rounds))
    return path


def load_edit_state(directory: Path, layers: Sequence[int], intermediate_size: int) -> EditState:
    """The state an earlier edit left in `directory` (its layers must match), or an empty one."""
    path = Path(directory) / EDIT_STATE_FILE
    if not path.is_file():
        return EditState.empty(layers, intermediate_size)
    with np.load(path) as saved:
        if list(saved["layers"]) != list(layers):
            raise ValueError(f"{path}: earlier edits used layers {list(saved['layers'])}, not {list(layers)}; "
                             f"edit the same layers to keep those edits protected")
        return EditState(list(layers), saved["previous"].astype(np.float32), int(saved["rounds"]))
