# voltgate wire constants: the one table that firmware and host share.
# Runs on MicroPython and CPython. protocol/SPEC.md explains each value;
# the host loads this file by path (voltgate.wire), so there is no second copy.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# COSE (RFC 9052) and CWT (RFC 8392) numbers
TAG_CWT = const(61)
TAG_MAC0 = const(17)
HDR_ALG = const(1)
HDR_CRIT = const(2)
HDR_KID = const(4)
ALG_HMAC256_64 = const(4)
ALG_HMAC256_256 = const(5)

# Claim keys: registered CWT claims, then voltgate private claims (< -65536)
CLAIM_ISS = const(1)
CLAIM_SUB = const(2)
CLAIM_AUD = const(3)
CLAIM_EXP = const(4)
CLAIM_NBF = const(5)
CLAIM_IAT = const(6)
CLAIM_CTI = const(7)
CLAIM_EXI = const(40)
CLAIM_ACTION = const(-65537)
CLAIM_SCOPE = const(-65538)
CLAIM_LIMITS = const(-65539)
CLAIM_USES = const(-65540)
CLAIM_BATTERY = const(-65541)  # a return permit may name the battery (its id)

# keys inside the limits map
LIMIT_WH = const(1)
LIMIT_W = const(2)

# actions
ACTION_RENT = const(1)
ACTION_RETURN = const(2)
ACTION_POWER = const(3)
ACTION_SERVICE = const(4)
ACTION_NAMES = ("", "rent", "return", "power", "service")

# uses
USES_MANY = const(0)
USES_SINGLE = const(1)

# size bounds
MAX_PERMIT = const(512)  # bytes of one permit token
MAX_CTI = const(32)  # bytes of a permit id
MAX_SCOPE = const(16)  # indexes in a scope (a station has at most 16 slots)
MAX_TEXT_CLAIM = const(64)  # bytes of iss, sub, aud
MAX_BATTERY_ID = const(16)  # bytes of a battery id
MAX_FRAME = const(2048)  # payload bytes of one serial frame

# Message envelope (SPEC.md, Messages): a CBOR map with these keys
ENV_TYPE = const(0)  # uint, MSG_*
ENV_ID = const(1)  # uint, request id; a reply echoes it
ENV_DEVICE = const(2)  # text, device id (serial link; implied by the topic on MQTT)
ENV_BODY = const(3)  # any, the message's own fields
ENV_REASON = const(4)  # uint, reason code of an error reply
ENV_COUNTER = const(5)  # uint, anti-replay counter of a command
ENV_NONCE = const(6)  # bytes, the board's fresh nonce a time sync answers
ENV_EXP = const(7)  # uint, Unix time after which a signed command is stale

# Message types: requests 1-31 (server to board), replies 32-63 (board to
# server, 32 + request type), unsolicited 64-95 (board to server)
MSG_HELLO = const(1)
MSG_STATUS = const(2)
MSG_GET_LOG = const(3)
MSG_ACK = const(4)
MSG_TIME_SYNC = const(5)
MSG_REVOKE = const(6)
MSG_RELAY_OFF = const(7)
MSG_UNLOCK = const(8)
MSG_CLEAR_FAULT = const(9)
MSG_CONFIG = const(10)
MSG_PING = const(11)
MSG_PRESENT = const(12)  # a permit handed over a local channel
MSG_REPLY = const(32)  # reply type = MSG_REPLY + request type
MSG_ERROR = const(63)
MSG_ALARM = const(64)
MSG_STATE = const(65)  # online / offline (the retained state and the last will)

# Flash log record types (SPEC.md, Readings log). The range says how a full
# log treats them: readings are thinned first, events next, billing last.
LOG_READINGS_END = const(32)  # 1..31: readings
LOG_EVENTS_END = const(64)  # 32..63: events; 64..95: billing
LOG_SLOT_READING = const(1)
LOG_OUTLET_READING = const(2)
LOG_BOOT = const(32)
LOG_STATE = const(33)
LOG_PERMIT = const(34)  # a permit verdict
LOG_ALARM = const(35)
LOG_CLOCK = const(36)
LOG_ERROR = const(37)  # an unhandled exception, logged before a reset
LOG_CONFIG = const(38)
LOG_COMMAND = const(39)  # a signed command's verdict: [type, reason, counter]
LOG_BATTERY_OUT = const(64)
LOG_BATTERY_IN = const(65)
LOG_SESSION_START = const(66)
LOG_SESSION_END = const(67)
LOG_ENERGY = const(68)

# Reason codes. 0 is success; every rejection has one code, logged and shown.
# Append only: a code, once published, keeps its number and meaning.
OK = const(0)
MALFORMED = const(1)
TOO_LARGE = const(2)
BAD_ALG = const(3)
NO_KEY = const(4)
UNKNOWN_KEY = const(5)
BAD_MAC = const(6)
WRONG_AUDIENCE = const(7)
TIME_UNTRUSTED = const(8)
NOT_YET_VALID = const(9)
EXPIRED = const(10)
REVOKED = const(11)
REPLAYED = const(12)
WRONG_ACTION = const(13)
OUT_OF_SCOPE = const(14)
STORE_FULL = const(15)  # the board cannot remember one more permit or revocation
STORE_LOST = const(16)  # the board's permit store was damaged: it refuses permits
UNAVAILABLE = const(17)  # a valid permit no slot or outlet can serve now; not used up

REASON_NAMES = (
    "ok",
    "malformed",
    "too_large",
    "bad_alg",
    "no_key",
    "unknown_key",
    "bad_mac",
    "wrong_audience",
    "time_untrusted",
    "not_yet_valid",
    "expired",
    "revoked",
    "replayed",
    "wrong_action",
    "out_of_scope",
    "store_full",
    "store_lost",
    "unavailable",
)


def reason_name(code):
    if 0 <= code < len(REASON_NAMES):
        return REASON_NAMES[code]
    return "reason_" + str(code)


def json_form(v):
    """Claims (or any decoded CBOR of ints, text, bytes, lists, maps) as
    JSON-able values: map keys become strings, bytes become hex. The console,
    the vectors and the host print claims in this one form."""
    if isinstance(v, dict):
        out = {}
        for k in v:
            out[str(k)] = json_form(v[k])
        return out
    if isinstance(v, (list, tuple)):
        return [json_form(x) for x in v]
    if isinstance(v, (bytes, bytearray, memoryview)):
        from binascii import hexlify

        return hexlify(bytes(v)).decode()
    return v
