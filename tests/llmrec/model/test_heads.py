"""The embedding head's late fusion: every branch has an equal say at start, whatever its raw norm."""
import torch

from llmrec.model.heads import EmbeddingHead


def test_branches_are_balanced_whatever_their_raw_norm():
    head = EmbeddingHead(hidden=4, dim=4, audio_dim=4, cover_dim=4)
    with torch.no_grad():
        for branch in (head.text, head.audio, head.cover):
            branch.weight.copy_(torch.eye(4))
        head.text.bias.zero_()
    # LM hidden states are large, pooled encoder features tiny: by hand, the unit branches sum to (1, 1, 1, 0)/sqrt 3.
    out = head(torch.tensor([[1000.0, 0, 0, 0]]), torch.tensor([[0, 1e-3, 0, 0]]), torch.tensor([[0, 0, 1e-3, 0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.0, 0.0]]) / 3 ** 0.5)
    # The learned scales move the balance: a larger audio scale pulls the embedding towards the audio branch.
    with torch.no_grad():
        head.branch_log_scale[1] = 1.0
    out = head(torch.tensor([[1000.0, 0, 0, 0]]), torch.tensor([[0, 1e-3, 0, 0]]), torch.tensor([[0, 0, 1e-3, 0]]))
    assert out[0, 1] > out[0, 0] and torch.isclose(out.norm(), torch.tensor(1.0))


def test_text_only_head_is_unit_norm():
    head = EmbeddingHead(hidden=8, dim=4)
    out = head(torch.randn(3, 8) * 50)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_sentence_branch_is_a_fourth_balanced_branch():
    head = EmbeddingHead(hidden=4, dim=4, audio_dim=4, cover_dim=4, text_dim=4)
    with torch.no_grad():
        for branch in (head.text, head.audio, head.cover, head.sentence):
            branch.weight.copy_(torch.eye(4))
        head.text.bias.zero_()
    e = torch.eye(4)
    out = head(1000 * e[:1], 1e-3 * e[1:2], 1e-3 * e[2:3], 0.5 * e[3:4])
    torch.testing.assert_close(out, torch.full((1, 4), 0.5))  # four unit branches, by hand: (1,1,1,1)/2
    # a song without text features (a zero row) adds nothing
    torch.testing.assert_close(head(1000 * e[:1], 1e-3 * e[1:2], 1e-3 * e[2:3], torch.zeros(1, 4)),
                               head(1000 * e[:1], 1e-3 * e[1:2], 1e-3 * e[2:3]))
