"""sslasr: self-supervised speech pretraining and ASR fine-tuning recipes."""

__version__ = "0.1.0"
