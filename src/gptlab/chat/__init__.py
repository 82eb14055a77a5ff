"""The chat stage: fine-tune a base run on conversations (sft), talk to the result (chat), and build instruction sets."""
