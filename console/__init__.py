"""What a person looks at: terminal progress (progress.py), the HTML report (report.py), the demo
runner (demo.py) and its generated sample images (samples.py). Reads through outbox/, never writes
engine state of its own; nothing in outbox/, stages/ or workers/ imports it."""
