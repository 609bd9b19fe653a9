import pickle

import pytest

from dnad.errors import DatasetNotFoundError, DivergenceError, InputError

ERRORS = [
    InputError("search.epochs", "abc", "not an int"),
    DatasetNotFoundError("data.root", "/x", "missing"),
    DivergenceError("search", 12, 5, "loss"),
]


@pytest.mark.parametrize("err", ERRORS)
def test_errors_survive_pickling(err):
    """Ray ships worker exceptions to the driver by pickle: type and message must arrive intact."""
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert vars(back) == vars(err)
