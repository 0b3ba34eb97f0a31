"""Running fedseg as a real deployment: the local process federation and its helpers."""
