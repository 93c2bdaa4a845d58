import dashkv


def test_version():
    assert dashkv.__version__
