from shared.errors import Conflict, Forbidden, Unauthorized


class EmailAlreadyRegistered(Conflict):
    detail = "This email is already registered in this tenant"


class InvitationRequired(Forbidden):
    # One answer for every reason (no invitation, an unknown, expired, revoked or used one, one
    # for another email or tenant): it reveals nothing about the tenant or the invitation.
    detail = "Registration in an existing tenant needs a valid invitation for this email"


class InvalidCredentials(Unauthorized):
    # One message for a wrong password and an unknown email: the answer reveals neither.
    detail = "Incorrect email or password"
