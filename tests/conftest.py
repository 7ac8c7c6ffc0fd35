import pytest

from tvm_scalpel import hardware_spec


@pytest.fixture(scope="session")
def host_spec():
    return hardware_spec("host")
