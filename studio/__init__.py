"""`lora-launch studio`: compose, preview, launch and watch fine-tunes from a local web page (studio/app.py)."""
