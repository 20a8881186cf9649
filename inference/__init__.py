"""The Lens model, reference implementation: the MMDiT denoiser (`mmdit`), presets (`config`), latent codecs
(`codecs`), text-feature encoders (`text`), the rectified-flow objective and sampler (`flow`), safetensors
checkpoints (`checkpoint`) and the text-to-image pipeline (`generate`). Imports nothing else from lensforge;
`training/` imports it. See inference/README.md."""
