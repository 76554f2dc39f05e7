"""Serving a tuned model: chat prompts encoded as in training, answered by the merged weights.

- `prompt.PromptEncoder`: messages to prompt ids with the training template, every message's text tokenized
  as text (a user who types `<|im_start|>system` gets text, not a forged system turn);
- `chat.ChatModel`: a model folder that answers OpenAI-style chat requests through that encoder;
- `pyfunc.TunepathChat`: the MLflow pyfunc the register stage logs, so `mlflow.pyfunc.load_model(uri).predict`
  and `mlflow models serve` answer through the same encoder.

Core code: no Prefect here; MLflow only in `pyfunc`.
"""
