"""The caching phase of a run: where the caches go (memory or disk, decided by the main process for all),
the VAE's latents and the text encoder's outputs encoded (each process its share), and the encoders kept or
let go. It runs before the DiT is loaded, so the encoders leave the GPU first when their outputs are cached.
"""

from __future__ import annotations

from anima_core.data import PhaseProgress
from anima_core.data.caching import ModelSource
from anima_core.data.memory import place_profile_caches
from anima_core.training.devices import DTYPES, free_memory


def run_caching(trainer) -> tuple[object | None, object]:
    """Cache what the profile asks for; returns (the VAE, or None when latents are cached, the text encoder)."""
    if trainer.profile.slider.pairs:  # its prompts' outputs, once; no images (training/slider.py)
        from anima_core.training.slider import slider_caching

        return slider_caching(trainer)
    profile, processes, data = trainer.profile, trainer.processes, trainer.data
    caching, model = profile.caching, profile.model
    vae_dtype, te_dtype = DTYPES[model.vae_dtype], trainer.text_encoder_dtype

    def report(progress: PhaseProgress) -> None:  # data phases as `cache` events and console lines
        trainer.events.emit("cache", **progress.fields())
        trainer.display.message(progress.describe())

    # the main process's estimate decides for all, so all take the same path (and meet the same times)
    placement = processes.from_main(
        place_profile_caches(data, profile, text_dtype=te_dtype, progress=report) if processes.is_main else None)
    for line in placement.lines:
        trainer.log(line)
    if placement.switched:
        trainer.warn(placement.switched)
    if caching.cache_latents or caching.cache_latents_to_disk:
        def load_vae():
            return trainer.models.load_vae(model, dtype=vae_dtype, device=trainer.device)

        identity = getattr(trainer.models, "vae_identity", None)  # without it, load first to learn the identity
        vae = ModelSource(identity(model, dtype=vae_dtype), str(vae_dtype), load_vae) if identity else load_vae()
        trainer.log("caching latents")
        divided(processes, placement.latents_to_disk, lambda share, exchange: data.cache_latents(
            vae, to_disk=placement.latents_to_disk, batch_size=caching.vae_batch_size, device=trainer.device,
            share=share, exchange=exchange, trust_existing=caching.skip_cache_check, progress=report))
        del vae
        free_memory(trainer.device)
        vae = None
    else:
        vae = trainer.models.load_vae(model, dtype=vae_dtype, device=trainer.device)
    text_encoder = trainer.models.load_text_encoder(model, dtype=te_dtype, device=trainer.device)
    if caching.cache_text_encoder_outputs or caching.cache_text_encoder_outputs_to_disk:
        trainer.log("caching text-encoder outputs")
        divided(processes, placement.text_to_disk, lambda share, exchange: data.cache_text(
            text_encoder, to_disk=placement.text_to_disk, batch_size=caching.text_encoder_batch_size,
            share=share, exchange=exchange, trust_existing=caching.skip_cache_check, progress=report))
        if profile.network.train_unet_only:
            text_encoder.model.to("cpu")
            free_memory(trainer.device)
    return vae, text_encoder


def divided(processes, to_disk: bool, cache) -> None:
    """``cache(share, exchange)`` with this process's share. On disk, each process writes its share of the
    files, and once all are written each reads the others' (the reuse check finds them fresh). In memory,
    each encodes its share and the processes hand each other every encode batch as it is done."""
    share = (processes.index, processes.num_processes)
    if not processes.distributed:
        cache(share, None)
    elif to_disk:
        cache(share, None)
        processes.exchange()
        cache((0, 1), None)
    else:
        cache(share, processes.exchange)
