"""The transformers reference outputs the parity tests compare ours with."""

from types import SimpleNamespace

import torch


def transformers_outputs(base_model, waveform, lengths, attention_mask):
    """transformers' outputs for the batch. With a group-norm extractor, each utterance run
    alone: transformers takes that norm's statistics over the padding too, where ours (given the
    lengths) gives a padded utterance what it gives alone. Otherwise the padded batch itself."""
    if base_model.config.feat_extract_norm != "group":
        return base_model(waveform, attention_mask=attention_mask, output_hidden_states=True)
    alone = [base_model(waveform[b:b + 1, :n], output_hidden_states=True) for b, n in enumerate(lengths.tolist())]
    frames = max(out.last_hidden_state.shape[1] for out in alone)

    def stacked(tensors):
        return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, frames - t.shape[1])) for t in tensors])
    return SimpleNamespace(last_hidden_state=stacked([out.last_hidden_state for out in alone]),
                           hidden_states=tuple(stacked([out.hidden_states[i] for out in alone])
                                               for i in range(len(alone[0].hidden_states))))
