"""The Transformer-XL reference's evaluation, written out plainly for comparison with ours.

From kimiyoung/transformer-xl (pytorch/): data_utils.LMOrderedIterator (the split cut
into `bsz` streams, read `bptt` tokens at a time to the end, the last read shorter),
eval.py's loop (`total_loss += seq_len * loss; total_len += seq_len`) and
mem_transformer.py's attention mask with same_length. Batch-first here; the reference
is time-first, which changes no number.
"""
import torch


def reference_mask(qlen: int, mlen: int, mem_len: int, same_length: bool) -> torch.Tensor:
    """mem_transformer.py `_forward`: True where a query must not attend."""
    klen = mlen + qlen
    all_ones = torch.ones(qlen, klen)
    if not same_length:
        return torch.triu(all_ones, diagonal=1 + mlen).bool()
    mask_len = klen - mem_len
    mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
    return (torch.triu(all_ones, 1 + mlen) + torch.tril(all_ones, -mask_shift_len)).bool()


def ordered_iterator(data: torch.Tensor, bsz: int, bptt: int):
    """LMOrderedIterator: (inputs, targets, seq_len) per read."""
    n_step = data.numel() // bsz
    streams = data[:n_step * bsz].view(bsz, n_step)
    for i in range(0, n_step - 1, bptt):
        seq_len = min(bptt, n_step - 1 - i)
        yield streams[:, i:i + seq_len], streams[:, i + 1:i + 1 + seq_len], seq_len


@torch.no_grad()
def reference_eval_loss(model, data: torch.Tensor, bsz: int, bptt: int) -> float:
    """eval.py's `evaluate`: the mean loss per token over the split, memory carried between reads."""
    model.eval()
    total_loss, total_len, mems = 0.0, 0, None
    for inputs, targets, seq_len in ordered_iterator(data, bsz, bptt):
        out = model(inputs, targets, mems)
        mems = out.mems
        total_loss += seq_len * out.loss.item()
        total_len += seq_len
    return total_loss / total_len
