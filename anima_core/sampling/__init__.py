"""Preview images: the flow-matching Euler sampler, sd-scripts prompt files, previews during training and
`anima-train sample`."""

from anima_core.sampling.prompts import PromptFile, PromptFileError, SamplePrompt, load_prompt_file, parse_prompt_line
from anima_core.sampling.sampler import (
    TextConditioning,
    euler_step,
    flow_sigmas,
    guided_velocity,
    render_prompt,
    sample_latents,
)

__all__ = [
    "PromptFile",
    "PromptFileError",
    "SamplePrompt",
    "TextConditioning",
    "euler_step",
    "flow_sigmas",
    "guided_velocity",
    "load_prompt_file",
    "parse_prompt_line",
    "render_prompt",
    "sample_latents",
]
