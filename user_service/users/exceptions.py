from shared.errors import Conflict, Unauthorized


class EmailAlreadyRegistered(Conflict):
    detail = "This email is already registered in this tenant"


class InvalidCredentials(Unauthorized):
    # One message for a wrong password and an unknown email: the answer reveals neither.
    detail = "Incorrect email or password"
