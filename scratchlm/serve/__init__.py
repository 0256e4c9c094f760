"""Serve stage: a trained model answering people and programs. `chat` is the terminal chat,
`engine` runs concurrent requests as one batch, `server` is the OpenAI-compatible HTTP API and
`web` its chat page. The sampler and the chat templates they all use live lower down, in
`scratchlm.model.sampling` and `scratchlm.tokenizer.chat_template`, because training,
evaluation and fine-tuning sample and render chats too."""
