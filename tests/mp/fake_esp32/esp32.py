# Stand-in for the ESP32 port's `esp32` module: NVS only, in memory.
# Errors as the port raises them: OSError(-<esp_err_t>, "<name>").
ESP_ERR_NVS_NOT_FOUND = -0x1102
ESP_ERR_NVS_INVALID_LENGTH = -0x110C

namespaces = {}  # namespace -> {key: int or bytes}
commits = []  # namespace of each commit()


class NVS:
    def __init__(self, namespace):
        self._ns = namespace
        self._d = namespaces.setdefault(namespace, {})

    def _get(self, key, kind):
        v = self._d.get(key)
        if not isinstance(v, kind):
            raise OSError(ESP_ERR_NVS_NOT_FOUND, "ESP_ERR_NVS_NOT_FOUND")
        return v

    def get_i32(self, key):
        return self._get(key, int)

    def set_i32(self, key, value):
        if not -(2**31) <= value < 2**31:
            raise OverflowError("overflow converting long int to machine word")
        self._d[key] = value

    def get_blob(self, key, buffer):
        v = self._get(key, bytes)
        if len(v) > len(buffer):
            raise OSError(ESP_ERR_NVS_INVALID_LENGTH, "ESP_ERR_NVS_INVALID_LENGTH")
        buffer[: len(v)] = v
        return len(v)

    def set_blob(self, key, value):
        self._d[key] = bytes(value)

    def erase_key(self, key):
        if key not in self._d:
            raise OSError(ESP_ERR_NVS_NOT_FOUND, "ESP_ERR_NVS_NOT_FOUND")
        del self._d[key]

    def commit(self):
        commits.append(self._ns)
