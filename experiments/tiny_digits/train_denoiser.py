"""Stage 2: train the MMDiT denoiser jointly with both CLIP text encoders (rectified flow, as SD3).

Objective (SD3, Esser et al. 2024, eq. 1 with the rectified-flow path): ``x_t = (1 − t)·x_0 + t·ε``
with ``t`` logit-normal(0, 1), the network predicts the velocity ``v = ε − x_0`` from ``x_t`` and
``timestep = 1000·t`` (the pipeline's ``FlowMatchEulerDiscreteScheduler`` then integrates
``x ← x + (σ_next − σ)·v``). Captions go through the pipeline's own ``encode_prompt`` (with
gradients), so training and sampling share one text path; 10 % of captions are replaced by the
empty prompt, the pipeline's negative prompt, for classifier-free guidance.

Without T5 the pipeline appends ``max_sequence_length`` identical zero tokens (256 by default, 1
in obsdiff's tiny configs); a fraction of the steps uses 256 so that both work.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusion3Pipeline

from experiments.tiny_digits.components import (
    assemble,
    new_text_encoder,
    new_tokenizer,
    new_transformer,
)
from experiments.tiny_digits.train_vae import lr_factor
from obsdiff.models.digits_data import (
    TEMPLATES,
    Caption,
    load_mnist,
    make_caption,
    random_captions,
    render_captions,
    split_indices,
)

# The pipeline components the denoiser stage trains (both families name them alike).
TRAINED = ("transformer", "text_encoder", "text_encoder_2")
CHECKPOINT_EVERY = 500  # steps between resumable states, when a checkpoint path is given


@dataclass
class DenoiserSettings:
    """Optimisation settings of the denoiser stage."""

    steps: int = 9000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    long_context_prob: float = 0.02  # SD3: steps with 256 zero "T5" tokens instead of 1
    ema_decay: float = 0.998
    latent_copies: int = 8  # colourings per training digit, encoded once (see LatentPool)
    seed: int = 0


class Ema:
    """Exponential moving average of parameters, with the usual ``(1 + n) / (10 + n)`` warm-up."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        """Copies the modules' parameters as the initial average.

        Args:
            modules: Modules whose parameters are averaged.
            decay: The asymptotic decay.
        """
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        """Moves the average towards the current parameters."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        """Writes the average into modules shaped like the averaged ones."""
        params = [p for m in modules for p in m.parameters()]
        for target, average in zip(params, self.shadow, strict=True):
            target.copy_(average)


class LatentPool:
    """Training digits, each painted ``copies`` times and encoded once: batches skip the VAE encoder.

    The posterior mean and standard deviation are kept, so every draw still takes a fresh latent
    sample; the caption template is drawn anew for every draw.
    """

    @torch.no_grad()
    def __init__(self, vae: AutoencoderKL, copies: int, generator: torch.Generator, chunk: int = 500):
        """Encodes ``copies`` random colourings of every training digit.

        Args:
            vae: The trained VAE.
            copies: Colourings per digit.
            generator: The random source of colours.
            chunk: Images per encoder call.
        """
        images, labels = load_mnist()
        index = split_indices("train").repeat(copies)
        self.captions = random_captions(labels[index], generator)
        means, stds = [], []
        for start in range(0, len(index), chunk):
            stop = start + chunk
            painted = render_captions(images[index[start:stop]], self.captions[start:stop])
            posterior = vae.encode(painted * 2 - 1).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.shift, self.scale = vae.config.shift_factor, vae.config.scaling_factor

    def batches(self, batch_size: int, generator: torch.Generator):
        """Endless batches of normalised latent samples and their captions (template redrawn)."""
        while True:
            index = torch.randint(len(self.mean), (batch_size,), generator=generator)
            templates = torch.randint(len(TEMPLATES), (batch_size,), generator=generator).tolist()
            mean, std = self.mean[index], self.std[index]
            latents = mean + std * torch.randn(mean.shape, generator=generator)
            captions = [
                make_caption(c.digit, c.fg, c.bg, template)
                for c, template in zip((self.captions[i] for i in index.tolist()), templates, strict=True)
            ]
            yield (latents - self.shift) * self.scale, captions


def flow_loss(
    pipe: StableDiffusion3Pipeline, z0: torch.Tensor, texts: list[str], max_sequence_length: int, generator
) -> torch.Tensor:
    """Rectified-flow velocity loss of one batch (mean squared error on ``ε − x_0``)."""
    batch = z0.shape[0]
    t = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal(0, 1)
    noise = torch.randn(z0.shape, generator=generator)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * z0 + t_ * noise
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=texts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    velocity = pipe.transformer(
        hidden_states=x_t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=t * 1000
    ).sample
    return (velocity - (noise - z0)).square().mean()


def train_denoiser(
    vae: AutoencoderKL,
    settings: DenoiserSettings,
    log_every: int = 100,
    snapshot_every: int = 0,
    snapshot_dir: Path | None = None,
    checkpoint: Path | None = None,
) -> StableDiffusion3Pipeline:
    """Trains the transformer and both text encoders; returns the pipeline with averaged weights.

    Args:
        vae: The trained VAE (frozen), with latent normalisation set.
        settings: Steps, batch size, learning rate, dropout, EMA, seed.
        log_every: Print the running loss every this many steps.
        snapshot_every: Save the averaged weights every this many steps (0: never) ...
        snapshot_dir: ... as ``snapshot_dir/step<N>`` (diffusers folders).
        checkpoint: Resumable training state (see :func:`optimise`); ``None``: none.

    Returns:
        A ``StableDiffusion3Pipeline`` holding the EMA weights, in eval mode.
    """
    generator = torch.Generator().manual_seed(settings.seed + 1)
    tokenizer = new_tokenizer()
    text_encoders = (
        new_text_encoder(tokenizer, settings.seed + 1),
        new_text_encoder(tokenizer, settings.seed + 2),
    )
    transformer = new_transformer(settings.seed + 3)
    pipe = assemble(vae.requires_grad_(False), transformer, text_encoders, tokenizer)

    def step_loss(z0: torch.Tensor, texts: list[str], captions: list[Caption]) -> torch.Tensor:
        long_context = torch.rand((), generator=generator).item() < settings.long_context_prob
        return flow_loss(pipe, z0, texts, 256 if long_context else 1, generator)

    optimise(pipe, vae, step_loss, settings, generator, log_every, snapshot_every, snapshot_dir, checkpoint)
    return pipe


def optimise(
    pipe: DiffusionPipeline,
    vae: AutoencoderKL,
    step_loss: Callable[[torch.Tensor, list[str], list[Caption]], torch.Tensor],
    settings: DenoiserSettings,
    generator: torch.Generator,
    log_every: int,
    snapshot_every: int,
    snapshot_dir: Path | None,
    checkpoint: Path | None = None,
    auxiliary: torch.nn.Module | None = None,
) -> None:
    """Trains the pipeline's transformer and text encoders in place, ending on their EMA weights.

    Shared by both families: AdamW with warm-up and cosine decay, gradient clipping, caption
    dropout (the empty prompt), EMA, batches from a :class:`LatentPool`.

    Args:
        pipe: A pipeline whose ``transformer``, ``text_encoder`` and ``text_encoder_2`` are trained.
        vae: The trained VAE (frozen) that encodes the latent pool.
        step_loss: The loss of one batch of normalised latents, its texts (empty where the caption
            was dropped) and its captions (may draw from ``generator``).
        settings: Steps, batch size, learning rate, dropout, EMA, seed.
        generator: The random source of batches, dropout and the loss.
        log_every: Print the running loss every this many steps.
        snapshot_every: Save the averaged weights every this many steps (0: never) ...
        snapshot_dir: ... as ``snapshot_dir/step<N>`` (diffusers folders).
        checkpoint: If given, the full training state (weights, optimiser, EMA, random state) is
            written there every :data:`CHECKPOINT_EVERY` steps, training resumes from it when it
            exists (giving the same weights as an uninterrupted run), and it is deleted at the end.
        auxiliary: Extra trained parameters the loss uses (e.g. probe heads), not kept afterwards.
    """
    trained = [getattr(pipe, name).train() for name in TRAINED]
    params = [p for module in trained for p in module.parameters()]
    if auxiliary is not None:  # trained with the pipeline, neither averaged nor saved with it
        params += list(auxiliary.train().parameters())
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, betas=(0.9, 0.99), weight_decay=settings.weight_decay
    )
    extra = [] if auxiliary is None else [auxiliary]
    ema = Ema(trained, settings.ema_decay)
    batches = LatentPool(vae, settings.latent_copies, generator).batches(settings.batch_size, generator)
    first = 0
    if checkpoint is not None and checkpoint.exists():
        first = resume(checkpoint, settings, trained + extra, optimizer, ema, generator)
        print(f"denoiser resumed at step {first} from {checkpoint}")
    start, running, summed = time.time(), 0.0, 0
    for step in range(first, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup)
        z0, captions = next(batches)
        keep = torch.rand(len(captions), generator=generator) >= settings.caption_dropout
        texts = [c.text if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
        loss = step_loss(z0, texts, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        ema.update()
        running, summed = running + loss.item(), summed + 1
        if (step + 1) % log_every == 0:
            elapsed = time.time() - start
            print(f"denoiser step {step + 1}/{settings.steps} loss {running / summed:.4f} {elapsed:.0f}s")
            running, summed = 0.0, 0
        if snapshot_every and (step + 1) % snapshot_every == 0:
            snapshot = copy.deepcopy(pipe)
            ema.copy_to([getattr(snapshot, name) for name in TRAINED])
            snapshot.save_pretrained(snapshot_dir / f"step{step + 1}")
        if checkpoint is not None and (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < settings.steps:
            save_checkpoint(checkpoint, step + 1, settings, trained + extra, optimizer, ema, generator)
    ema.copy_to(trained)
    for module in trained:
        module.eval()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)


def save_checkpoint(
    path: Path,
    step: int,
    settings: DenoiserSettings,
    trained: list[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    ema: Ema,
    generator: torch.Generator,
) -> None:
    """Writes the training state after ``step`` steps (atomically: a kill never leaves half a file)."""
    state = {
        "step": step,
        "settings": asdict(settings),
        "modules": [module.state_dict() for module in trained],
        "optimizer": optimizer.state_dict(),
        "ema_shadow": ema.shadow,
        "ema_updates": ema.updates,
        "generator": generator.get_state(),
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


@torch.no_grad()
def resume(
    path: Path,
    settings: DenoiserSettings,
    trained: list[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    ema: Ema,
    generator: torch.Generator,
) -> int:
    """Restores a state written by :func:`save_checkpoint`; returns the number of steps it had done.

    Raises:
        ValueError: If the checkpoint was written with other settings.
    """
    state = torch.load(path, weights_only=True)
    if state["settings"] != asdict(settings):
        raise ValueError(f"checkpoint {path} has settings {state['settings']}, not {asdict(settings)}")
    for module, weights in zip(trained, state["modules"], strict=True):
        module.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    for average, saved in zip(ema.shadow, state["ema_shadow"], strict=True):
        average.copy_(saved)
    ema.updates = state["ema_updates"]
    generator.set_state(state["generator"])
    return state["step"]
