"""Model path: transformers Mistral/Llama bodies with varlen attention, logits-free forward."""
