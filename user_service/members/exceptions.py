from shared.errors import Conflict, Forbidden, NotFound


class NotAllowed(Forbidden):
    detail = "Your role does not allow this"


class MemberNotFound(NotFound):
    detail = "No such member in your tenant"


class InvitationNotFound(NotFound):
    detail = "No such pending invitation in your tenant"


class AlreadyMember(Conflict):
    detail = "This email already has an account in your tenant"


class LastOwner(Conflict):
    detail = "A tenant keeps at least one owner: make someone else owner first"
