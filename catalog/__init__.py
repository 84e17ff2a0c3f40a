"""The runs repository: run dirs and sweep trials on disk read back, listed, compared and drawn, never trained."""
