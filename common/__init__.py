"""What every lensforge stage uses and no stage owns: atomic writes, the one-writer lock, image decoding, HTML
reports, progress lines and Ray start-up on loopback (common/README.md). Imports nothing else from lensforge."""
